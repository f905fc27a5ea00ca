"""LoRA adapters in and out: the run's :class:`LoraSpec`, PEFT adapter directories written and read.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, whose keys are the
base model's module names under ``base_model.model.`` with ``lora_A`` / ``lora_B`` inserted (for
Llama ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, A as ``[r, in]``, B as
``[out, r]``), and, for a classifier, its head's weights (PEFT's ``modules_to_save``). Both the key
names and the layer each adapter belongs to come from the family's one weight table, so no family
has a second table for adapters.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ConfigError, ModelError
from jaxtune.models import lora
from jaxtune.models.registry import family

log = logging.getLogger(__name__)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "sequence_classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "base": "FEATURE_EXTRACTION",
}


def spec_from_config(config, base_model) -> lora.LoraSpec | None:
    """The run's adapters: ``model.adapter``'s (read for ``base_model``, abstract is enough), else
    ``lora.*``'s when ``lora.rank`` > 0, else None."""
    if config.model.adapter:
        return read_spec(config.model.adapter, base_model(), config.train.seed)
    c = config.lora
    if not c.rank:
        return None
    return lora.LoraSpec(
        c.rank, float(c.alpha), c.targets, bool(c.rslora), float(c.dropout), config.train.seed
    )


def head_entries(cfg, task) -> tuple:
    """The table entries of a classifier's head outside the base model (``score``, ``classifier``,
    DistilBERT's ``pre_classifier``; not BERT's pretrained ``bert.pooler``): what trains in full beside
    the adapters and travels in the PEFT file (PEFT's ``modules_to_save``). None for other tasks."""
    if task.name not in ("sequence_classification", "token_classification"):
        return ()
    fam = family(cfg.model_type, "model")
    prefix = fam.KEY_PREFIX[cfg.model_type]
    return tuple(e for e in fam.hf_table(cfg, task) if not e[0].startswith(prefix))


def trainable(spec: lora.LoraSpec | None, cfg, task) -> object:
    """With adapters, what trains: a path predicate true for the adapters and a classifier's head
    (:func:`head_entries`); None without adapters."""
    if spec is None:
        return None
    head = {path for _, path, _ in head_entries(cfg, task)}
    return lambda path: lora.is_adapter(path) or path in head


def _module_keys(table) -> dict:
    """Our dense layer's path -> (its Hugging Face module key template, the kernel's transform)."""
    return {
        path.removesuffix(".kernel"): (template.removesuffix(".weight"), tx)
        for template, path, tx in table
        if path.endswith(".kernel") and template.endswith(".weight")
    }


def peft_table(model, table) -> tuple:
    """The weight table of a model's PEFT file: its adapters and (classifiers) its trained head."""
    keys, out = _module_keys(table), []
    for path, module in lora.dense_layers(model):
        if not hasattr(module, lora.A):
            continue
        if path not in keys:
            raise ModelError(f"the adapted layer {path} has no Hugging Face name in the family's table")
        template, _ = keys[path]
        for name, tx in lora.transforms(module).items():
            peft = "lora_A" if name == lora.A else "lora_B"
            out.append((f"{PREFIX}{template}.{peft}.weight", f"{path}.{name}", tx))
    for template, path, tx in head_entries(model.cfg, model.task):
        out.append((PREFIX + template, path, tx))
    return tuple(out)


def target_modules(model, table):
    """PEFT's ``target_modules``: the adapted layers' Hugging Face module names (``q_proj``), or a regex
    of their full names when a short name also belongs to a layer left without an adapter (GPT-2's
    ``c_proj`` is in its attention and in its MLP)."""
    keys = _module_keys(table)
    adapted, plain = set(), set()
    for path, module in lora.dense_layers(model):
        if path in keys:
            (adapted if hasattr(module, lora.A) else plain).add(keys[path][0])
    short = {k.rsplit(".", 1)[-1] for k in adapted}
    if short.isdisjoint(k.rsplit(".", 1)[-1] for k in plain):
        return sorted(short)
    return "^(?:" + "|".join(re.escape(k).replace(r"\{i\}", r"\d+") for k in sorted(adapted)) + ")$"


def save(model, out_dir: str, base: str = "") -> str:
    """Write ``model``'s adapters as a PEFT directory (every process calls it on a pod; process 0
    writes). ``base``: the base model's path or hub id, for ``base_model_name_or_path``."""
    from safetensors.numpy import save_file

    from jaxtune import hf, pretrained

    spec, cfg, task = model.lora, model.cfg, model.task
    if spec is None:
        raise ModelError("the model has no LoRA adapters to write; export it without --adapter")
    fam = family(cfg.model_type, "model")
    table = fam.hf_table(cfg, task)
    params = {path: v.get_value() for path, v in pretrained.by_path(nnx.state(model, nnx.Param)).items()}
    entries = peft_table(model, table)
    state = {path: pretrained.OnHost(params[path]) for _, path, _ in entries}
    tensors = {key: np.ascontiguousarray(arr) for key, arr in hf.state_to_hf(state, entries)}
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[task.name],
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": target_modules(model, table),
        "use_rslora": spec.rslora,
        "lora_dropout": spec.dropout,
        "bias": "none",
        "base_model_name_or_path": base or None,
        # GPT-2's Conv1D stores its weight [in, out]; PEFT needs to know to transpose its delta.
        "fan_in_fan_out": cfg.model_type == "gpt2",
        "modules_to_save": sorted({e[0][len(PREFIX) :].split(".")[0] for e in entries if "lora_" not in e[0]})
        or None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    return out_dir


def _read_config(path: str) -> dict:
    where = os.path.join(path, CONFIG)
    if not os.path.isfile(where):
        raise ModelError(f"{path}: not a PEFT adapter directory (no {CONFIG})")
    try:
        with open(where, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{where}: not valid JSON ({e})") from e
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{where}: peft_type {config.get('peft_type')!r}; jaxtune loads LORA adapters")
    for key, fine in (("use_dora", False), ("bias", "none")):
        if config.get(key, fine) != fine:
            raise ModelError(f"{where}: {key} = {config[key]!r} is not supported (only {fine!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules"):
        if config.get(key):
            raise ModelError(
                f"{where}: {key} = {config[key]!r} is not supported (adapters on every layer only)"
            )
    if config.get("lora_bias") or config.get("use_qalora") or config.get("target_parameters"):
        raise ModelError(f"{where}: lora_bias, use_qalora and target_parameters are not supported")
    return config


def read_spec(adapter_dir: str, base_model, seed: int = 0) -> lora.LoraSpec:
    """The :class:`LoraSpec` of a PEFT directory for ``base_model`` (abstract is enough): its rank,
    alpha, rsLoRA and dropout, and as targets our regex of the layers its ``target_modules`` names."""
    c = _read_config(adapter_dir)
    wanted = c.get("target_modules") or []
    cfg = base_model.cfg
    keys = _module_keys(family(cfg.model_type, adapter_dir).hf_table(cfg, base_model.task))
    ours = []
    for path, _ in lora.dense_layers(base_model):
        if path not in keys:
            continue
        name = keys[path][0].replace("{i}", "0")
        if isinstance(wanted, str):
            hit = re.fullmatch(wanted, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in wanted)
        if hit:
            ours.append(path)
    if not ours:
        raise ModelError(
            f"{adapter_dir}: target_modules {wanted!r} names no layer of this {cfg.model_type} model"
        )
    return lora.LoraSpec(
        int(c["r"]),
        float(c["lora_alpha"]),
        "^(?:" + "|".join(map(re.escape, ours)) + ")$",
        bool(c.get("use_rslora", False)),
        float(c.get("lora_dropout", 0.0) or 0.0),
        seed,
    )


def fill(model, adapter_dir: str) -> None:
    """Set a model's adapters (and trained head) to a PEFT directory's weights, in place; each lands in
    the shards its present value has."""
    from jaxtune import hf, sharding
    from jaxtune.pretrained import by_path

    cfg, task = model.cfg, model.task
    fam = family(cfg.model_type, adapter_dir)
    entries = peft_table(model, fam.hf_table(cfg, task))
    weights = os.path.join(adapter_dir, WEIGHTS)
    if not os.path.isfile(weights):
        raise ModelError(f"{adapter_dir}: has no {WEIGHTS}")
    tensors = hf.read_safetensors(weights)
    params = by_path(nnx.state(model, nnx.Param))
    shapes = {path: params[path].shape for _, path, _ in entries}
    heads = {path for key, path, _ in entries if "lora_" not in key}
    loaded = set()
    for path, lazy in hf.state_from_hf(tensors, _Peft(fam), cfg, entries, shapes, np.float32, fresh=heads):
        var = params[path]
        value = var.get_value()
        where = getattr(value, "sharding", None)
        arr = lazy.read().astype(value.dtype)
        var.set_value(sharding.put(arr, where) if where is not None else jnp.asarray(arr))
        loaded.add(path)
    missing = sorted(heads - loaded)
    if missing:
        log.warning(
            "%s: holds no trained head (%s); the model's own is kept", adapter_dir, ", ".join(missing)
        )


class _Peft:
    """A PEFT file's view of a family for :func:`hf.state_from_hf`: its keys carry their full names."""

    IGNORED_KEYS, HEAD_KEYS, TIED_KEYS, KEY_RENAMES = (), (), (), ()

    def __init__(self, fam):
        self.KEY_PREFIX = dict.fromkeys(fam.KEY_PREFIX, PREFIX)


def load(model, adapter_dir: str):
    """``model`` (without adapters) with a PEFT adapter directory's adapters on it: a new model whose
    base parameters are ``model``'s own arrays."""
    if getattr(model, "lora", None) is not None:
        raise ConfigError(
            f"{adapter_dir}: the model already has LoRA adapters (a LoRA run's checkpoint); load the "
            "adapter onto its base model, or export the run merged and use that"
        )
    from jaxtune.pretrained import by_path

    fam = family(model.cfg.model_type, adapter_dir)
    spec = read_spec(adapter_dir, model)
    dtype = model.embed[...].dtype
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: fam.MODEL(model.cfg, model.task, rngs=nnx.Rngs(0), dtype=dtype, lora=spec))
    )
    base = {path: var.get_value() for path, var in by_path(nnx.state(model)).items()}
    for path, var in by_path(state).items():
        # An adapter starts at zero here; fill() sets it from the file.
        var.set_value(base[path] if path in base else jnp.zeros(var.shape, var.dtype))
    adapted = nnx.merge(graphdef, state)
    fill(adapted, adapter_dir)
    return adapted
