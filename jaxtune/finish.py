"""End-of-run actions: load the best checkpoint (``checkpoint.load_best_at_end``, or an export of the
best), sample answers (``sample.prompts``) and export Hugging Face weights (``export.at_end``)."""

from __future__ import annotations

import json
import logging
import os

import jax
from flax import nnx

from jaxtune import fs, optim, pretrained
from jaxtune.hf import stale_weight_files

log = logging.getLogger("jaxtune.train")


def wants_best(config) -> bool:
    """The run ends on the best checkpoint when asked to, and so does the export unless it is told to
    take the last one."""
    return bool(
        config.checkpoint.load_best_at_end or (config.export.at_end and config.export.checkpoint == "best")
    )


def load_best(config, ckpt, step: int, state: dict, frozen: dict, abstract: dict):
    """(state, frozen, best step or None): the best checkpoint's parameters in place of the last ones,
    when the config wants them and the best is not the last step itself."""
    top = ckpt.best_step()
    if not (wants_best(config) and top and top[0] != step):
        return state, frozen, None
    ckpt.wait()
    items = ckpt.restore_best(top[0], {"params": abstract["params"], "frozen": abstract["frozen"]})
    log.info(
        "loaded the best checkpoint (step %d, %s %.4f) for the end of the run",
        top[0],
        config.checkpoint.best_metric,
        top[1],
    )
    return dict(state, params=items["params"]), items["frozen"], top[0]


def samples_and_export(
    config, workdir: str, graphdef, params, frozen, tokenizer, mesh=None, rules=()
) -> None:
    """Sample answers and the Hugging Face export, as the config asks; the samples are generated on
    the run's ``mesh`` (the KV cache sharded under its ``rules``, as the activations were)."""
    if not (config.sample.prompts or config.export.at_end):
        return
    model = nnx.merge(graphdef, optim.merge(params, frozen))
    if config.sample.prompts and model.task.name == "causal_lm":
        from jaxtune.generate import Generator

        chat = getattr(tokenizer, "chat_template", None) is not None
        prompts = list(config.sample.prompts)
        # Every process generates (the model spans them all); the prompts go through together.
        generator = Generator(model, tokenizer, mesh, rules)
        answers = generator.complete(prompts, config.sample.max_new_tokens, chat=chat)
        rows = [{"prompt": p, "answer": a.text} for p, a in zip(prompts, answers, strict=True)]
        if jax.process_index() == 0:
            for row in rows:
                print(f"sample> {row['prompt']}\n{row['answer']}\n")
            fs.write_text(os.path.join(workdir, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    if config.export.at_end:  # every process: the tensors are gathered from all; process 0 writes
        out = os.path.join(workdir, "export")
        # Process 0 writes; only it may clear an older export's weights from a bucket.
        stale = stale_weight_files if jax.process_index() == 0 else None
        with fs.staged(out, stale=stale) as local:
            pretrained.save_pretrained(
                model, local, tokenizer=tokenizer, dtype=config.export.dtype or config.model.param_dtype
            )
        log.info("exported Hugging Face weights to %s", out)
