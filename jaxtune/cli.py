"""What every ``python -m jaxtune.X`` command shares: flags with ``--help``, the config-file loader with
``--config.KEY=VALUE`` overrides, console logging, and one mapping from errors to a single line on
stderr and an exit status (see :mod:`jaxtune.errors`)."""

from __future__ import annotations

import argparse
import ast
import errno
import logging
import os
import sys
import traceback
import types

from jaxtune.errors import BAD_INPUT, FAILED, ConfigError, JaxtuneError, UsageError, first_line

INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are a UsageError (one line, the common exit status), not usage text."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}; see {self.prog} --help")


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser for ``python -m jaxtune.<prog>`` whose ``--help`` shows the module's docstring."""
    return _Parser(
        prog=f"python -m jaxtune.{prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE[:arg]`` and ``--workdir DIR``; ``--config.KEY=VALUE`` overrides follow them."""
    p.add_argument("--config", required=True, metavar="configs/X.py[:arg]", help="the run's config file")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, export)")
    p.epilog = (
        "Any config key can be set from the command line: --config.KEY=VALUE (for example "
        "--config.train.max_steps=100 --config.optimizer.lr=1e-4). The keys and their defaults are listed, "
        "with comments, in jaxtune/config.py: defaults()."
    )


def _line_in(path: str, error: BaseException) -> int | None:
    """The line of ``path`` where ``error`` was raised (the innermost frame in that file)."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    return lines[-1] if lines else None


def load_config(spec: str, overrides: list[str]):
    """The locked ConfigDict of ``spec`` (``FILE.py`` or ``FILE.py:arg``: ``get_config(arg)``) with the
    ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) arguments applied; a ConfigError naming the file
    and line, or the key, otherwise."""
    import ml_collections

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass --config configs/NAME.py")
    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        code = compile(source, path, "exec")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start}); save it as UTF-8") from e
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}; fix the config file") from e
    module = types.ModuleType(os.path.splitext(os.path.basename(path))[0])
    module.__file__ = path
    try:
        exec(code, module.__dict__)
        get_config = module.__dict__.get("get_config")
        if not callable(get_config):
            raise ConfigError(
                f"{path}: defines no get_config(); a config file returns its ConfigDict from "
                "get_config(arg=None) (see configs/smoke.py)"
            )
        config = get_config(arg) if arg else get_config()
    except ConfigError:
        raise
    except Exception as e:
        line = _line_in(path, e)
        where = f"{path}:{line}" if line else path
        raise ConfigError(f"{where}: {type(e).__name__}: {first_line(e)}; fix the config file") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned a {type(config).__name__}, not a ConfigDict")
    for key, value in _overrides(overrides):
        _set(config, key, value)
    return config.copy_and_resolve_references().lock()


def _overrides(args: list[str]) -> list[tuple[str, str | None]]:
    """(key, text) pairs of ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` / ``--config.KEY`` (a bool)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--noconfig.") and "=" not in arg:  # absl's spelling of a false bool
            out.append((arg[len("--noconfig.") :], "false"))
            i += 1
            continue
        if not arg.startswith("--config."):
            raise UsageError(
                f"unknown argument {arg!r}; config keys are set as --config.KEY=VALUE; see --help"
            )
        key, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = None if nxt is None or nxt.startswith("--") else nxt
            i += value is not None
        out.append((key, value))
        i += 1
    return out


def _set(config, key: str, text: str | None) -> None:
    from jaxtune.config import defaults, flat, unknown_key

    known = flat(defaults())
    if key not in known:
        raise unknown_key(key, known)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    current = node[leaf] if leaf in node else known[key]
    with node.unlocked():
        node[leaf] = _parse(key, text, current)


def _parse(key: str, text: str | None, current):
    """``text`` as a value of the type ``current`` has."""
    what = f"config key {key} = {text!r} (from the command line)"
    if isinstance(current, bool):
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text is None:
            return True
        if text.lower() not in words:
            raise ConfigError(f"{what} is not a bool; use true or false")
        return words[text.lower()]
    if text is None:
        raise ConfigError(f"config key {key} has no value; pass --config.{key}=VALUE")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{what} is not an int (like the default {current!r})") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{what} is not a number (like the default {current!r})") from None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string (for a tuple key, its one element), as config_flags reads it
    if isinstance(current, tuple | list):
        return tuple(value) if isinstance(value, tuple | list) else (value,)
    return value


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes, not the stream of the
    moment it was made (a caller, or a test, may swap and close that one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def log_to_console() -> None:
    # force: an imported library may already have configured the root logger at WARNING.
    logging.basicConfig(
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", handlers=[_Stderr()], force=True
    )
    logging.getLogger("jaxtune").setLevel(logging.INFO)


def os_error_message(e: OSError) -> str:
    """One line for a file the OS refused, naming it and the way out."""
    name = e.filename or ""
    if e.filename2:
        name = f"{name} -> {e.filename2}"
    reason = e.strerror or first_line(e) or type(e).__name__
    fixes = {
        errno.ENOSPC: "free disk space or write somewhere else",
        errno.EROFS: "write to a writable directory",
        errno.EACCES: "check the permissions or write somewhere else",
        errno.EPERM: "check the permissions or write somewhere else",
        errno.ENOTDIR: "a file stands where a directory should be; move it or pick another path",
        errno.EISDIR: "a directory stands where a file should be; pick another path",
        errno.ENOENT: "check the path",
    }
    fix = fixes.get(e.errno, "check the path")
    return f"{name}: {reason}; {fix}" if name else f"{reason}; {fix}"


def report(e: BaseException) -> int:
    """Print ``e`` as one ``error:`` line on stderr; return the command's exit status."""
    if isinstance(e, JaxtuneError):
        message, code = str(e), e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        message, code = "interrupted", INTERRUPTED
    else:  # OSError: an output or input the OS refused (read-only, full, a file for a directory)
        message = os_error_message(e)
        code = BAD_INPUT if isinstance(e, FileNotFoundError) else FAILED
    print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return code


def run(body, *args) -> int:
    """``body(*args)``, with what a user can fix reported in one line; 0 when it returns.

    Anything else (a bug in jaxtune) keeps its traceback: that is what a bug report needs."""
    try:
        body(*args)
    except (JaxtuneError, OSError, KeyboardInterrupt) as e:
        return report(e)
    return 0


def main(
    p,
    body,
    argv=None,
    with_config: bool = False,
    multihost: bool = False,
    compilation_cache: bool = True,
    trains: bool = False,
) -> int:
    """Parse ``argv`` with ``p`` (for ``with_config`` commands also the ``--config.KEY`` overrides into
    ``args.config``, a ConfigDict, and its ``train.compilation_cache_dir`` in use unless
    ``compilation_cache`` is False), log to the console, join the multi-process runtime (``multihost``
    commands: see :mod:`jaxtune.distributed`), run ``body(args)``; return the exit status. Commands
    that ``trains`` get their config's ``train.keep_host_memory`` (:func:`jaxtune.hostmem.prepare`)."""
    from jaxtune import distributed, hostmem

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if multihost:
            distributed.add_arguments(p)  # its defaults read JAXTUNE_*: a bad value is one line
        if with_config:
            args, rest = p.parse_known_args(argv)
            args.config = load_config(args.config, rest)
            if compilation_cache:
                use_compilation_cache(args.config.train.compilation_cache_dir)
            if trains and args.config.train.keep_host_memory:
                hostmem.prepare()  # before JAX's runtime starts
        else:
            args = p.parse_args(argv)
    except (JaxtuneError, OSError) as e:
        return report(e)
    log_to_console()
    if multihost:
        status = run(distributed.initialize, args.coordinator, args.num_processes, args.process_id)
        if status:
            return status
        _quiet_unless_main()
    return run(body, args)


def use_compilation_cache(path: str) -> None:
    """Keep compiled programs in ``path`` (JAX's persistent cache; a local folder or a gs:// one), before
    anything compiles; "" = off. JAX keeps compiles of a second or more (its
    ``jax_persistent_cache_min_compile_time_secs``, which the environment can set), the train step's
    included."""
    if not path:
        return
    import jax

    if "://" not in path:  # a URL (gs://) is JAX's to resolve; a local path is made absolute
        path = os.path.abspath(os.path.expanduser(path))
    jax.config.update("jax_compilation_cache_dir", path)


def _quiet_unless_main() -> None:
    """On a process other than 0, only warnings and errors reach the console (each tagged with the
    process): process 0 speaks for the run."""
    import jax

    if jax.process_count() == 1:
        return
    tag = f"[process {jax.process_index()}] "
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(name)s: %(message)s", "%H:%M:%S"))
    if jax.process_index() != 0:
        logging.getLogger("jaxtune").setLevel(logging.WARNING)
