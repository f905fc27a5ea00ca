"""The errors jaxtune raises for what a user can fix, and the exit status each gives a command.

Every message is one line naming the file, line, key or value at fault and the way out. The classes
also derive from the built-in type a Python caller would expect (a missing model is still a
``FileNotFoundError``, bad data still a ``ValueError``), so library code can catch either. This module
imports nothing, so every layer (models included) may raise these.
"""

from __future__ import annotations

# Exit statuses shared by every command: 2 for input a user can correct before anything ran (flags,
# config, data, model files), 1 for a run that started and could not go on.
BAD_INPUT = 2
FAILED = 1


def first_line(error) -> str:
    """The first non-blank line of an exception's message (or its type's name): foreign errors are
    quoted in one line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


class JaxtuneError(Exception):
    """Base class: a problem the message explains in one line, with the way out."""

    exit_code = BAD_INPUT


class UsageError(JaxtuneError, ValueError):
    """A command-line flag that is missing, unknown or has a bad value."""


class ConfigError(JaxtuneError, ValueError):
    """A config mistake, in one line naming the key, the value and the fix."""


class DataError(JaxtuneError, ValueError):
    """Bad data: the message names the file and line (or record) and the way out."""


class ModelError(JaxtuneError, ValueError):
    """A model directory, GGUF file or checkpoint file that cannot be read as the model it claims to be."""


class ModelNotFound(JaxtuneError, FileNotFoundError):
    """A model, tokenizer or run directory that is not where the path says."""


class DataNotFound(JaxtuneError, FileNotFoundError):
    """A data file or glob that matches nothing."""


class OutputError(JaxtuneError, OSError):
    """An output path that cannot be written (checked before any work is done)."""


class TrainingError(JaxtuneError, RuntimeError):
    """The run cannot go on (a NaN loss, say); the message names the step and the last good checkpoint."""

    exit_code = FAILED


class CheckpointError(JaxtuneError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the step, the directory and the way out."""

    exit_code = FAILED


class WorkdirBusy(JaxtuneError, RuntimeError):
    """Another live run holds the workdir's lock."""

    exit_code = FAILED


class RuntimeJoinError(JaxtuneError, RuntimeError):
    """The processes of a multi-process run could not form one runtime (no coordinator, a timeout)."""

    exit_code = FAILED
