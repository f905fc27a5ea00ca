"""The training run as an abstract plan: the model's graph, the abstract train state with its shardings,
the batch shapes, the optimizer and which parameters train, built from the config and a mesh without
allocating a parameter.

As a command, whether a config fits a TPU topology, from a CPU machine (see :mod:`jaxtune.aot`)::

    python -m jaxtune.plan --config configs/llama3_8b.py --topology v5p-32 [--num_slices N] [--json]

It compiles the real train step for the topology with the TPU compiler (``pip install -e '.[tpu]'``),
allocating nothing, and prints the memory per device against the chip's HBM, the FLOPs per step and
the step time at 40% and 60% MFU. Exit status 0 when it fits, 1 when it does not. ``--topology cpu:N``
plans for N host devices and needs no TPU compiler. Topology names: see the README's table.

Training *materialises* a plan (weights loaded straight into their shards, or initialised in ``jit``)
and compiles the step the plan declares; an ahead-of-time compile for a TPU topology lowers the same
step from the same plan on the topology's abstract devices. Nothing about the step is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxtune import adapter, optim, pretrained, sharding, steps
from jaxtune.config import validate
from jaxtune.errors import ConfigError, TrainingError
from jaxtune.models import heads, presets
from jaxtune.models.layers import CallOptions
from jaxtune.models.registry import family


def mesh_rules(config) -> tuple:
    """``config.mesh.rules`` as a tuple of (logical name, mesh axis or axes) pairs."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)


def _label_kwargs(labels) -> dict:
    """A classifier's label space (:class:`jaxtune.models.heads.Labels`) as load_pretrained's keywords."""
    if labels is None:
        return {}
    return {"problem_type": labels.problem_type, "id2label": list(labels.names)}


def load_model(config, mesh, rules, labels=None, lora=None):
    """The model of ``config.model.path`` (a preset name: random init) in ``param_dtype``, in its shards;
    a classifier gets ``labels`` (a :class:`jaxtune.models.heads.Labels`) as its id2label and
    problem_type; ``lora`` (the :class:`ModelSpec`'s): adapters, ``model.adapter``'s weights when set."""
    c = config.model
    kwargs = dict(task=c.task, seed=config.train.seed, mesh=mesh, rules=rules, lora=lora)
    kwargs |= _label_kwargs(labels)
    if c.path in presets.PRESETS:
        model = pretrained.model_from_config(presets.hf_config(c.path), c.param_dtype, **kwargs)
    else:
        model = pretrained.load_pretrained(c.path, c.param_dtype, new_head=c.new_head, **kwargs)
    if c.adapter:
        adapter.fill(model, c.adapter)
    return model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model a config asks for, abstractly: its graph, its state's shapes and dtypes (no
    shardings yet), its architecture config and its task."""

    graphdef: object
    state: object  # nnx.State of jax.ShapeDtypeStruct
    cfg: object
    task: heads.Task
    lora: object = None  # a lora.LoraSpec when adapters train


def model_spec(config, labels=None) -> ModelSpec:
    """The abstract model of ``config.model``: a preset's, or the one a checkpoint's config.json (or
    GGUF header) describes, with ``labels`` as a classifier's label space. Reads no weights."""
    c = config.model
    if c.path in presets.PRESETS:
        hf, where = presets.hf_config(c.path), c.path
    else:
        where = pretrained.resolve(c.path)
        if where.endswith(".gguf"):
            from jaxtune import gguf

            hf = gguf.read(where)[0]  # the header; tensors are read lazily, so none is
        else:
            hf = pretrained.read_config(where)
    fam = family(hf.model_type, where)
    cfg = fam.config_from_hf(hf)
    new_head = c.new_head and c.path not in presets.PRESETS
    task = pretrained.resolve_task(hf, fam, where, c.task, new_head=new_head, **_label_kwargs(labels))
    dtype = jnp.dtype(c.param_dtype)
    seed = config.train.seed
    # A PEFT adapter names Hugging Face modules: the base model's table gives ours.
    lora = adapter.spec_from_config(
        config, lambda: nnx.eval_shape(lambda: fam.MODEL(cfg, task, rngs=nnx.Rngs(seed), dtype=dtype))
    )
    abstract = nnx.eval_shape(lambda: fam.MODEL(cfg, task, rngs=nnx.Rngs(seed), dtype=dtype, lora=lora))
    graphdef, state = nnx.split(abstract)
    return ModelSpec(graphdef, state, cfg, task, lora)


def _floating_as(x, dtype):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
    return x.astype(dtype)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class Plan:
    """Everything the train and eval steps need, abstractly. ``abstract`` and ``shardings`` hold
    ``params`` (what trains), ``frozen`` (the rest of the model), ``opt_state`` and ``step``."""

    config: object
    mesh: Mesh
    rules: tuple
    spec: ModelSpec
    is_frozen: object
    tx: object
    lr_schedule: object
    objective: steps.Objective
    options: CallOptions
    abstract: dict
    shardings: dict
    batch_sharding: object
    train_step: object  # jax.jit of steps.make_train_step, shardings declared, state donated
    eval_step: object
    token_types: bool = False  # classifier batches carry token_type_ids (the tokenizer makes them)

    def batch_spec(self, length: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and sharding of a global training batch whose rows are ``length`` long."""
        c = self.config
        b, task = c.train.batch_size, self.spec.task
        if task.name == "causal_lm":
            names = {"input_ids": np.int32, "targets": np.int32, "attention_mask": np.int32}
            if c.data.packing and c.data.format != "text":  # text rows are cut from one stream, not packed
                names["segment_ids"] = np.int32
            names["loss_mask"] = np.float32
            shapes = dict.fromkeys(names, (b, length))
        else:
            names = {"input_ids": np.int32, "attention_mask": np.int32}
            if self.token_types:
                names["token_type_ids"] = np.int32
            shapes = dict.fromkeys(names, (b, length))
            single = task.problem_type == heads.SINGLE_LABEL
            one_value = task.problem_type == heads.REGRESSION and task.num_labels == 1
            names["labels"] = np.int32 if single else np.float32
            shapes["labels"] = (b,) if single or one_value else (b, task.num_labels)
            names["weights"], shapes["weights"] = np.float32, (b,)
        return {
            k: jax.ShapeDtypeStruct(shapes[k], np.dtype(dtype), sharding=self.batch_sharding)
            for k, dtype in names.items()
        }

    def check_batch(self, batch: dict) -> None:
        """A batch must be what the plan declared: the step is compiled from the declaration."""
        want = self.batch_spec(batch["input_ids"].shape[1])
        got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}
        expected = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in want.items()}
        if got != expected:
            raise TrainingError(
                f"the data's batches {got} are not the planned {expected}; this is a jaxtune bug, please "
                "report it with the config"
            )

    def lower(self, length: int):
        """The train step lowered for rows of ``length`` tokens, from abstract arguments only."""
        a = self.abstract
        state = {"params": a["params"], "opt_state": a["opt_state"], "step": a["step"]}
        return self.train_step.lower(state, a["frozen"], self.batch_spec(length))

    def materialise(self, labels=None, model=None) -> tuple[dict, dict]:
        """(train state, frozen parameters) on the mesh: the checkpoint's weights loaded into their
        shards, or a preset initialised in ``jit`` (``model``: one :func:`load_model` already made);
        optimizer state initialised in ``jit``."""
        if model is None:
            model = load_model(self.config, self.mesh, self.rules, labels, self.spec.lora)
        frozen, params = optim.split(nnx.to_pure_dict(nnx.state(model)), self.is_frozen)
        del model
        want = self.abstract["frozen"]
        frozen = jax.tree.map(
            lambda x, a: x if x.dtype == a.dtype else _floating_as(x, a.dtype), frozen, want
        )
        state = {
            "params": params,
            "opt_state": jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(params),
            "step": jax.device_put(jnp.zeros((), jnp.int32), self.shardings["step"]),
        }
        return state, frozen


def _check_attention(impl: str, mesh: Mesh, compute) -> None:
    """cuDNN's fused attention exists on NVIDIA GPUs, in 16-bit types: anything else is refused here, in
    one line, rather than by the compiler."""
    if impl != "cudnn":
        return
    platform = mesh.devices.flat[0].platform
    if platform != "gpu":
        raise ConfigError(
            f"config key model.attention = 'cudnn' needs an NVIDIA GPU and this run's devices are "
            f"{platform}; use 'xla' or 'reference'"
        )
    if compute.itemsize != 2:
        raise ConfigError(
            "config key model.attention = 'cudnn' needs model.compute_dtype bfloat16 or float16, "
            f"not {compute}"
        )


def plan(
    config, mesh: Mesh, total_steps: int, labels=None, spec: ModelSpec | None = None, token_types=None
) -> Plan:
    """The :class:`Plan` of ``config`` on ``mesh`` for a run of ``total_steps`` (the schedule's length);
    ``spec``: the :func:`model_spec`, when the caller already built it; ``token_types``: whether
    classifier batches carry token_type_ids (the data knows: its tokenizer makes them or not; without
    data, a model with token types is assumed to get them, as BERT's tokenizers give them)."""
    spec = spec or model_spec(config, labels)
    rules = mesh_rules(config)
    state = nnx.to_pure_dict(spec.state)
    model_shardings = sharding.state_shardings(spec.state, mesh, rules)
    is_frozen = optim.frozen_matcher(config.optimizer.frozen)
    adapters_only = adapter.trainable(spec.lora, spec.cfg, spec.task)
    if adapters_only is not None:  # LoRA: the adapters train (and a classifier's head); the base is frozen
        frozen_by_config = is_frozen

        def is_frozen(path):
            return frozen_by_config(path) or not adapters_only(path)

    frozen, params = optim.split(state, is_frozen)
    frozen_sh, params_sh = optim.split(model_shardings, is_frozen)
    base_dtype = config.lora.base_dtype if spec.lora is not None else ""
    if base_dtype:  # the frozen base stored in a smaller dtype (it is cast to compute_dtype anyway)
        frozen = jax.tree.map(lambda x: _floating_as(x, base_dtype), frozen)
    if not params:
        raise ConfigError(
            f"config key optimizer.frozen = {config.optimizer.frozen!r} freezes every parameter"
        )
    tx, lr_schedule = optim.make(config.optimizer, params, total_steps, spec.cfg.num_layers)
    opt_abstract = jax.eval_shape(tx.init, params)
    shardings = {
        "params": params_sh,
        "frozen": frozen_sh,
        "opt_state": sharding.like_params(opt_abstract, params, params_sh, mesh),
        "step": sharding.replicated(mesh),
    }
    abstract = {
        "params": _abstract(params, params_sh),
        "frozen": _abstract(frozen, frozen_sh),
        "opt_state": _abstract(opt_abstract, shardings["opt_state"]),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings["step"]),
    }
    batch_sh = sharding.batch_sharding(mesh, rules)
    objective = steps.Objective(spec.task, config.model.loss_chunk_tokens, sharding.batch_shards(batch_sh))
    options = CallOptions(remat=config.model.remat, attention=config.model.attention)
    compute = jnp.dtype(config.model.compute_dtype)
    _check_attention(config.model.attention, mesh, compute)
    step_fn = steps.make_train_step(
        spec.graphdef,
        tx,
        lr_schedule,
        compute_dtype=compute,
        accum_steps=config.train.grad_accum_steps,
        objective=objective,
        dropout=config.model.dropout,
        seed=config.train.seed,
        options=options,
        adapter_dropout=bool(spec.lora is not None and spec.lora.dropout),
    )
    state_sh = {k: shardings[k] for k in ("params", "opt_state", "step")}
    # state: sharded like the parameters and donated, since the old state is dead after the step;
    # frozen parameters: read only; batch: rows over (data, fsdp). Metrics come back replicated.
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sh, frozen_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    # Eval never rematerialises: there is no backward pass to save memory for.
    eval_options = dataclasses.replace(options, remat="none")
    eval_step = jax.jit(
        steps.make_eval_step(spec.graphdef, compute_dtype=compute, objective=objective, options=eval_options),
        in_shardings=(params_sh, frozen_sh, batch_sh),
        out_shardings=sharding.replicated(mesh),
    )
    return Plan(
        config,
        mesh,
        rules,
        spec,
        is_frozen,
        tx,
        lr_schedule,
        objective,
        options,
        abstract,
        shardings,
        batch_sh,
        train_step,
        eval_step,
        bool(getattr(spec.cfg, "type_vocab_size", 0)) if token_types is None else token_types,
    )


def _force_host_devices(argv) -> None:
    """``--topology cpu:N`` needs N host devices, which XLA creates only if told before it starts."""
    args = list(argv)
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--topology"]
    names += [a.split("=", 1)[1] for a in args if a.startswith("--topology=")]
    for name in names:
        if name.strip().lower().startswith("cpu:") and name.split(":", 1)[1].isdigit():
            flag = f"--xla_force_host_platform_device_count={int(name.split(':', 1)[1])}"
            flags = [
                f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
            ]
            os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
            if not os.environ.get("JAX_PLATFORMS"):
                # No accelerator runtime is started to be asked for its chips. jax read the
                # environment when it was imported, so its config is what takes this now.
                jax.config.update("jax_platforms", "cpu")


def _run(args) -> None:
    from jaxtune import aot, topology

    config = args.config
    where = topology.parse(args.topology, args.num_slices)
    devices = topology.devices(where)
    validate(config, len(devices))
    labels = None
    if config.model.task in heads.CLASSIFICATION:
        from jaxtune.data import training_labels

        labels = training_labels(config)
    mesh = sharding.make_mesh(config, devices)
    result = aot.report(config, where, devices, plan(config, mesh, config.train.max_steps or 1, labels))
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table(), flush=True)
    if not result.fits:
        raise aot.DoesNotFit(result.advice())


def main(argv=None) -> int:
    from jaxtune import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    _force_host_devices(argv)
    p = cli.parser("plan", __doc__)
    p.add_argument("--config", required=True, metavar="configs/X.py[:arg]", help="the run's config file")
    p.add_argument("--topology", required=True, help="v5p-32, v6e-256, v5litepod-16, v5p:2x2x4, cpu:8, ...")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over the data-center network")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    # Without the target's devices JAX can write a compiled step to its persistent cache but not load
    # it back (it needs a client of that platform), so the cache is not used here.
    return cli.main(p, _run, argv, with_config=True, compilation_cache=False)


if __name__ == "__main__":
    sys.exit(main())
