"""Generate text with a causal language model (a KV-cache engine: see :mod:`jaxtune.engine`).

    python -m jaxtune.generate --model PATH_OR_WORKDIR (--prompt TEXT [--prompt TEXT ...] | --input F.jsonl)
        [--chat] [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--repetition_penalty R]
        [--seed S] [--stop TEXT ...] [--batch_size B] [--adapter PEFT_DIR] [--output FILE.jsonl]

PATH is a Hugging Face directory, a hub id or a .gguf file; WORKDIR a training run's directory (its
best checkpoint, else its latest) or WORKDIR/checkpoints/STEP. ``--input`` lines are objects with a
``prompt`` (text) or ``messages`` (a chat: a list of ``{"role", "content"}``). ``--chat`` renders text
prompts as a user message through the tokenizer's chat template. Temperature 0 (the default) is
greedy. A completion ends at the tokenizer's EOS token, at a ``--stop`` text (left out of the
completion) or after ``--max_new_tokens``. A single prompt streams to the terminal; ``--output``
writes one line per prompt: ``{"prompt": ..., "completion": ..., "token_ids": [...]}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from jaxtune import cli, fs
from jaxtune.errors import DataError, ModelError, UsageError
from jaxtune.sampling import GREEDY, Sampler


@dataclasses.dataclass
class Completion:
    prompt: object  # the text, or the chat messages
    text: str
    token_ids: list


def eos_ids(value) -> set:
    """The ids of an ``eos_token_id`` field of config.json or generation_config.json: an int, a list
    (Llama 3's end of text and end of turn), or absent."""
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def _stop_ids(tokenizer, model=None, extra=()) -> tuple:
    """Where a completion ends: the tokenizer's EOS token, the model's config.json ``eos_token_id``
    (one id or several) and ``extra`` ids (a generation_config.json's)."""
    ids = set(extra)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model is not None:
        ids |= eos_ids(json.loads(model.cfg.hf_config_json).get("eos_token_id"))
    return tuple(sorted(ids))


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def encode(tokenizer, prompt, chat: bool = False) -> list[int]:
    """The token ids of a prompt: a text (as a user message through the chat template with ``chat``)
    or a list of chat messages, rendered with the generation prompt."""
    if isinstance(prompt, str) and not chat:
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError("the tokenizer has no chat template; pass text prompts without --chat")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


class Generator:
    """A model, its tokenizer and one engine: text in, completions out."""

    def __init__(self, model, tokenizer, mesh=None, rules=(), stop_ids=()):
        from jaxtune.engine import Engine

        self.engine, self.tokenizer = Engine(model, mesh, rules), tokenizer
        self.stop_ids = _stop_ids(tokenizer, model, stop_ids)

    def complete(
        self,
        prompts: list,
        max_new_tokens: int = 32,
        sampler: Sampler = GREEDY,
        seed: int = 0,
        chat: bool = False,
        stop: tuple = (),
        stream=None,
    ) -> list[Completion]:
        """One :class:`Completion` per prompt (text or messages). ``stop``: texts that end a completion
        (left out of it); ``stream(text)`` receives the first row's new text as it comes."""
        tok = self.tokenizer
        ids = [encode(tok, p, chat) for p in prompts]
        watch = _Watch(tok, stop, stream)
        rows = self.engine.generate(ids, max_new_tokens, sampler, seed, self.stop_ids, _pad_id(tok), watch)
        out = [
            Completion(p, _cut(tok.decode(r, skip_special_tokens=True), stop), r)
            for p, r in zip(prompts, rows, strict=True)
        ]
        watch.flush(out[0].text)
        return out


class _Watch:
    """What the engine calls with each row's tokens so far: ends a row at a stop string, and streams
    the first row's text (holding back what may still change) to ``stream``."""

    def __init__(self, tokenizer, stop, stream):
        self.tokenizer, self.stop, self.stream, self.printed = tokenizer, tuple(stop), stream, 0

    def __call__(self, row: int, so_far: list) -> bool:
        streaming = self.stream is not None and row == 0
        if not (self.stop or streaming):
            return False
        text = self.tokenizer.decode(so_far, skip_special_tokens=True)
        hit = any(s in text for s in self.stop)
        if streaming:
            self._show(_cut(text, self.stop) if hit else _settled(text, self.stop))
        return hit

    def _show(self, shown: str) -> None:
        self.stream(shown[self.printed :])
        self.printed = max(self.printed, len(shown))

    def flush(self, final: str) -> None:
        """The rest of the first completion: what was held back (a last partial character, a stop
        string's possible start)."""
        if self.stream is not None:
            self._show(final)


def _settled(text: str, stop) -> str:
    """What of ``text`` can be shown already: not a half-decoded character at its end (a token that
    ends inside a UTF-8 sequence), nor an ending that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - held]


def _cut(text: str, stop) -> str:
    """``text`` up to the first of the ``stop`` strings it holds."""
    ends = [text.find(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


def generate_ids(
    model,
    input_ids,
    attention_mask=None,
    max_new_tokens=32,
    eos_token_id=None,
    pad_token_id=0,
    sampler: Sampler = GREEDY,
    seed: int = 0,
):
    """The continuation of each row of (padded) ``input_ids``: a list of token-id lists, each ending
    at the first EOS (included) or after ``max_new_tokens``. Greedy unless ``sampler`` says otherwise."""
    from jaxtune.engine import Engine

    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    prompts = [row[keep > 0].tolist() for row, keep in zip(ids, mask, strict=True)]
    eos = () if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
    return Engine(model).generate(prompts, max_new_tokens, sampler, seed, eos, pad_token_id)


def generate(model, tokenizer, prompt_or_messages, max_new_tokens=32, **options) -> str:
    """The continuation of a prompt string, or the assistant's answer to a list of chat messages
    (``[{"role": "user", "content": ...}]``, rendered with the tokenizer's chat template). ``options``:
    ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty`` (see :class:`Sampler`), ``seed``,
    ``stop`` (texts that end it)."""
    seed, stop = options.pop("seed", 0), tuple(options.pop("stop", ()))
    out = Generator(model, tokenizer).complete(
        [prompt_or_messages], max_new_tokens, Sampler(**options), seed, stop=stop
    )
    return out[0].text


def prompts_from(args) -> list:
    """The ``--prompt`` texts, or the prompts of ``--input``'s lines (``prompt`` or ``messages``)."""
    if args.prompt:
        if not all(p.strip() for p in args.prompt):
            raise UsageError("--prompt is empty; give the text to continue")
        return list(args.prompt)
    from jaxtune.data import sources

    out = []
    for record, origin in sources.read(args.input):  # JSONL, JSON, CSV, ...: one record per prompt
        prompt = record.get("messages", record.get("prompt"))
        ok = isinstance(prompt, str) and prompt.strip()
        ok = ok or (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt))
        if not ok:
            raise DataError(
                f'{origin}: needs "prompt" (a text) or "messages" (a list of role/content objects)'
            )
        out.append(prompt)
    if not out:
        raise DataError(f"--input {args.input}: holds no prompt")
    return out


def generation_eos(path: str) -> set:
    """The ``eos_token_id`` of a model directory's generation_config.json (Gemma's end of turn, say)."""
    where = os.path.join(path, "generation_config.json")
    try:
        with open(where, encoding="utf-8") as f:
            return eos_ids(json.load(f).get("eos_token_id"))
    except FileNotFoundError:
        return set()
    except (ValueError, AttributeError, TypeError) as e:
        raise ModelError(f"{where}: not a generation config ({e}); fix or remove it") from e


def load(args):
    """(model, tokenizer) of ``--model``: a training run's checkpoint or a model."""
    from jaxtune.checkpoint import load_model, split_path

    is_run = fs.isfile(os.path.join(split_path(args.model)[0], "model", "config.json"))
    model, tokenizer = load_model(args.model if is_run else None, None if is_run else args.model)
    if args.adapter:
        from jaxtune import adapter

        model = adapter.load(model, args.adapter)
    if model.task.name != "causal_lm":
        raise ModelError(f"{args.model}: a {model.task.name} model; generate needs a causal language model")
    if tokenizer is None:
        raise ModelError(f"{args.model}: no tokenizer to read the prompts with; pass a model that has one")
    return model, tokenizer


def run(args) -> None:
    from jaxtune.predict import writable

    if args.output:
        writable("--output", args.output)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch_size and --max_new_tokens must be at least 1")
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    prompts = prompts_from(args)
    model, tokenizer = load(args)
    extra = generation_eos(args.model) if os.path.isdir(args.model) else set()
    gen = Generator(model, tokenizer, stop_ids=tuple(extra))
    stream = None
    if len(prompts) == 1 and not args.output:

        def stream(text):
            sys.stdout.write(text)
            sys.stdout.flush()

    from tqdm.auto import tqdm

    done = []
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2, leave=False):
        chunk = prompts[start : start + args.batch_size]
        done += gen.complete(
            chunk, args.max_new_tokens, sampler, args.seed + start, args.chat, tuple(args.stop), stream
        )
    if stream:
        sys.stdout.write("\n")
        return
    lines = "".join(
        json.dumps({"prompt": c.prompt, "completion": c.text, "token_ids": c.token_ids}) + "\n" for c in done
    )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(lines)
    else:
        sys.stdout.write(lines)


def main(argv=None) -> int:
    p = cli.parser("generate", __doc__)
    p.add_argument("--model", required=True, help="model directory, hub id, .gguf file or training run")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    inputs.add_argument("--input", help="JSONL file: one {prompt} or {messages} object per line")
    p.add_argument("--chat", action="store_true", help="text prompts as a user message (chat template)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a text that ends a completion (repeatable)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory to apply to the model")
    p.add_argument("--output", help="JSONL file to write (default: standard output)")
    return cli.main(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
