"""Run configuration: the defaults every config in configs/ starts from, and ``validate(config)``.

A config file is ``configs/x.py`` with ``get_config(arg=None) -> ConfigDict`` that starts from
:func:`defaults` and changes what it needs. ``validate`` runs at start-up, before anything is compiled,
and turns each mistake into one line naming the key, the value and the fix.
"""

from __future__ import annotations

import difflib
import math
import re

import ml_collections

from jaxtune.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "linear", "cosine", "wsd", "inverse_sqrt")
REMAT = ("none", "full", "dots")
FORMATS = ("text", "chat", "instruction", "classification")
TOO_LONG = ("truncate", "drop")
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Parameters: FSDP shards the model width, tensor parallelism the MLP,
# heads and vocabulary. Activations: the batch over data x fsdp. Names missing here stay replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
)


def defaults() -> ml_collections.ConfigDict:
    """Every key a run understands, with its default. Configs override values, never add keys."""
    c = ml_collections.ConfigDict()
    c.model = dict(
        path="",  # HF directory, .gguf file, hub id, or a preset name (random init; see models/presets.py)
        tokenizer="",  # "" = the model's own; a path or hub id; "bytes" = jaxtune's 256-byte tokenizer
        task="causal_lm",  # or sequence_classification (with data.format = "classification")
        new_head=False,  # classification: replace a checkpoint's head whose labels differ
        # classification: "" = from the training labels (lists: multi-label; non-integer numbers:
        # regression; else single-label), or single_label_classification | multi_label_classification
        # | regression
        problem_type="",
        param_dtype="float32",  # master weights and optimizer state
        compute_dtype="float32",  # forward/backward (bfloat16 on TPU/GPU); loss and softmax stay float32
        remat="none",  # none | full | dots (keep matmul outputs, recompute the rest)
        # the attention implementation: reference (einsums) | xla (jax.nn.dot_product_attention) | cudnn
        # (its cuDNN kernel; NVIDIA GPUs, 16-bit compute); Gemma 2's soft-capping and attention dropout
        # always take the reference
        attention="reference",
        # dropout rate in training steps, at BERT's and GPT-2's sites (embeddings, attention
        # probabilities, attention and MLP outputs, classifier input); 0 = none. transformers trains
        # BERT-family checkpoints with their config's 0.1.
        dropout=0.0,
        loss_chunk_tokens=1024,  # tokens per chunk (on each device) of the output layer + cross-entropy
        adapter="",  # a PEFT LoRA adapter directory to put on the model (continue training it)
    )
    # LoRA: low-rank adapters train, the base model stays frozen (a classifier's head trains in full).
    c.lora = dict(
        rank=0,  # r; 0 = off (full fine-tuning)
        alpha=16.0,  # the adapters' output is scaled by alpha / r (alpha / sqrt(r) with rslora)
        # regex searched in dense layers' paths (layers.attn.q_proj; GPT-2's fused layers.attn.qkv_proj)
        targets=r"attn\.(qkv|q|k|v|o)_proj|mlp\.",
        dropout=0.0,  # on the adapters' inputs, in training steps
        rslora=False,
        base_dtype="",  # store the frozen base in this dtype (bfloat16 halves it); "" = param_dtype
    )
    c.data = dict(
        # comma-separated files or globs (.jsonl .json .csv .tsv .parquet .txt .yml), tfds:NAME, hf:NAME
        train="",
        weights=(),  # one sampling weight per source in data.train: a mixture; () = one pool of all
        eval="",
        eval_fraction=0.0,  # with no data.eval: hold out this fraction of the training records
        max_train_records=0,  # read only the first N records of data.train (of each weighted source); 0 = all
        dedupe=False,  # drop repeated training records, keeping the first (classification: the same texts)
        split="train",  # the split of tfds: and hf: sources for data.train
        eval_split="validation",  # ... and for data.eval
        data_dir="",  # TFDS data_dir ("" = TFDS's default)
        format="text",  # text | chat (a messages list) | instruction (Alpaca fields)
        text_field="text",  # the field a text (or classification) record keeps its text in
        text_pair_field="",  # classification of text pairs: the second text's field
        label_field="label",  # classification: the label's field (names or integers)
        loss_on="assistant",  # chat / instruction: loss on the assistant's tokens, or "all"
        chat_template="",  # a Jinja chat template (or its file) instead of the tokenizer's own
        seq_len=128,
        # classification: cut each batch to its longest row, rounded up to a multiple of this (one compiled
        # step per length); 0 = every batch is seq_len long
        pad_to_multiple_of=0,
        packing=False,  # several examples per row (segment ids; attention and positions per example)
        # packing places each example first-fit in one of the last N rows opened (linear time and
        # bounded memory); 0 = every open row (quadratic in the worst case)
        pack_window=64,
        too_long="truncate",  # chat / instruction examples longer than a row: truncate | drop (counted)
        cache_dir="",  # keep tokenized rows here; reused while data, tokenizer and config are unchanged
        # read data.train lazily, tokenize in worker processes and pack as training goes (corpora too big
        # to prepare; needs train.max_steps); each process reads its own share of the files
        streaming=False,
        workers=0,  # tokenizer processes of jaxtune.prepare and streaming; 0 = cores - 1 (1: in process)
    )
    c.train = dict(
        batch_size=8,  # global, across all devices and micro-batches
        max_steps=0,  # 0: run num_epochs
        num_epochs=1,
        grad_accum_steps=1,
        seed=0,
        log_every=1,
        peak_tflops=0.0,  # per device, for MFU; 0 = from the device kind
        # JAX's persistent compilation cache: compiled steps are kept here and a rerun, a resume or
        # the next fold loads them instead of compiling again; "" = off
        compilation_cache_dir="",
        # on a CPU, `python -m jaxtune.train` and `jaxtune.crossval` keep each step's working memory in
        # the process instead of handing it back to the kernel, which zeroes it again every step
        # (jaxtune.hostmem; glibc, one device; where three such blocks fit in memory)
        keep_host_memory=True,
        # after SIGTERM / Ctrl-C, exit anyway (non-zero, no new checkpoint) if the step and its save are
        # not done within this many seconds; 0 = wait as long as they take
        stop_timeout_s=600.0,
    )
    c.optimizer = dict(
        name="adamw",
        lr=3e-4,
        schedule="cosine",
        warmup_steps=0,
        warmup_ratio=0.0,  # warmup as a fraction of the run's steps (when warmup_steps is 0)
        min_lr_ratio=0.0,  # final lr / peak lr for linear, cosine and wsd
        decay_fraction=0.2,  # wsd: the last fraction of steps decays
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        momentum=0.0,  # sgd
        nesterov=False,  # sgd
        clip_norm=1.0,  # global gradient norm; 0 = no clipping
        lr_layer_decay=1.0,  # layer i of L (0 = first) gets decay ** (L - i); embeddings decay ** (L + 1)
        lr_multipliers=(),  # ((regex, multiplier), ...) on parameter paths; first match wins
        frozen=(),  # (regex, ...): parameters that get no gradient and no optimizer state
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules=DEFAULT_RULES)
    c.checkpoint = dict(
        every_steps=0,  # 0: only at the end
        keep=3,  # the latest k
        async_save=True,
        best_metric="",  # an eval metric ("accuracy", "loss", ...): also keep the best_keep best by it
        best_mode="max",  # max | min
        best_keep=1,
        load_best_at_end=False,  # end the run (final eval, samples, export) with the best checkpoint
    )
    c.eval = dict(
        every_steps=0,
        at_start=False,
        max_batches=0,
        batch_size=0,  # 0: train.batch_size
        patience=0,  # early stopping: stop after this many evals without a gain in checkpoint.best_metric
        min_delta=0.0,  # the smallest change that counts as a gain
        metrics="",  # classifiers: extra metrics "pkg.module:fn[,...]"; fn(true, predicted) -> number or dict
    )
    c.sample = dict(prompts=(), max_new_tokens=32)  # generated at the end, printed and saved
    c.export = dict(
        at_end=False,  # Hugging Face weights in workdir/export
        dtype="",  # cast the exported weights ("" = param_dtype)
        checkpoint="best",  # with checkpoint.best_metric: export the best checkpoint, or "last"
    )
    return c


def accelerator_defaults() -> ml_collections.ConfigDict:
    """:func:`defaults` plus what large-model runs on TPU/GPU share: bfloat16 compute on float32
    master weights, ``dots`` rematerialisation, FSDP over every device, AdamW with b2 0.95 and weight
    decay 0.1, warmup then cosine to 10%, checkpoints and evals every 500 steps."""
    c = defaults()
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "dots"
    c.optimizer.warmup_steps = 100
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.optimizer.b2 = 0.95
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    return c


def classifier_defaults() -> ml_collections.ConfigDict:
    """:func:`defaults` plus what sequence-classification fine-tuning shares, Hugging Face Trainer's usual
    recipe: batches cut to their longest text (like Trainer's padding to the longest in the batch),
    batch 32, AdamW at 5e-5 with weight decay 0.01, a 10% warmup then a linear decay to 0; the best
    checkpoint by accuracy is kept and exported at the end. The config sets model.path (the classifier
    configs take all-MiniLM-L6-v2 from ``jaxtune.assets.minilm()``)."""
    c = defaults()
    c.model.task = "sequence_classification"
    c.data.format = "classification"
    c.data.pad_to_multiple_of = 8  # each batch as long as its longest text (in steps of 8), not seq_len
    c.train.batch_size = 32
    c.train.log_every = 10
    c.optimizer.lr = 5e-5
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.weight_decay = 0.01
    c.checkpoint.best_metric = "accuracy"
    c.export.at_end = True
    return c


def flat(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, ml_collections.ConfigDict | dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_type(key, value, default):
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if want is tuple and isinstance(value, list):
        return
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key {key} = {value!r} is a {type(value).__name__}; it must be a {want.__name__} "
            f"(like the default {default!r})"
        )


def _one_of(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"config key {key} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(key, value, zero_ok=False):
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"config key {key} = {value!r} must be {'>= 0' if zero_ok else '> 0'}")


def mesh_shape(config, num_devices: int) -> dict:
    """Mesh axis sizes with the one -1 inferred, checked against the device count."""
    sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    for axis, size in sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(
                f"config key mesh.{axis} = {size} must be >= 1, or -1 to use the remaining devices"
            )
    if len(unknown) > 1:
        raise ConfigError(
            f"config keys {', '.join('mesh.' + a for a in unknown)} are all -1; at most one may be"
        )
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(
                f"mesh.{unknown[0]} = -1 cannot be inferred: {num_devices} devices are not divisible by the "
                f"other axes' product {known}; change the mesh sizes"
            )
        sizes[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = {known} devices, "
            f"but {num_devices} are available; make the product {num_devices} or set one axis to -1"
        )
    return sizes


def unknown_key(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"config key {key} is unknown{hint}")


def validate(config, num_devices: int | None = None) -> None:
    """Raise :class:`ConfigError` for the first mistake in ``config``; return None when it is sound."""
    known = flat(defaults())
    given = flat(config)
    for key in given:
        if key not in known:
            raise unknown_key(key, known)
    for key, value in given.items():
        _check_type(key, value, known[key])
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key} = {value} is not a finite number; give it a real value")
    c = config
    if not c.model.path:
        raise ConfigError(
            "config key model.path is empty; set it to a model directory, .gguf, hub id or preset"
        )
    if not c.data.train:
        raise ConfigError("config key data.train is empty; set it to a text file, glob or list of files")
    from jaxtune.models import heads, layers

    _one_of("model.task", c.model.task, heads.TASKS)
    if c.model.task not in ("causal_lm", "sequence_classification"):
        raise ConfigError(
            f"config key model.task = {c.model.task!r}: training supports causal_lm, sequence_classification"
        )
    if (c.model.task == "sequence_classification") != (c.data.format == "classification"):
        raise ConfigError(
            f"config keys model.task = {c.model.task!r} and data.format = {c.data.format!r} do not match; "
            "sequence_classification trains on data.format='classification' and causal_lm on the others"
        )
    if c.model.problem_type:
        _one_of("model.problem_type", c.model.problem_type, heads.PROBLEM_TYPES)
    _one_of("model.param_dtype", c.model.param_dtype, DTYPES)
    _one_of("model.compute_dtype", c.model.compute_dtype, DTYPES)
    _one_of("model.remat", c.model.remat, REMAT)
    _one_of("model.attention", c.model.attention, layers.ATTENTION_IMPLS)
    _positive("model.loss_chunk_tokens", c.model.loss_chunk_tokens)
    _positive("lora.rank", c.lora.rank, zero_ok=True)
    if c.lora.base_dtype:
        _one_of("lora.base_dtype", c.lora.base_dtype, DTYPES)
    if not 0 <= c.lora.dropout < 1:
        raise ConfigError(f"config key lora.dropout = {c.lora.dropout!r}: must be in [0, 1)")
    if c.model.adapter and c.lora.rank:
        raise ConfigError(
            f"config keys model.adapter = {c.model.adapter!r} and lora.rank = {c.lora.rank}: the adapter "
            "brings its own rank, alpha and layers; set lora.rank = 0 to go on training it"
        )
    if c.lora.base_dtype and not (c.lora.rank or c.model.adapter):
        raise ConfigError(f"config key lora.base_dtype = {c.lora.base_dtype!r} needs LoRA (lora.rank > 0)")
    if c.lora.rank and c.lora.alpha <= 0:
        raise ConfigError(f"config key lora.alpha = {c.lora.alpha!r} must be > 0")
    if c.lora.rank or c.model.adapter:
        try:
            re.compile(c.lora.targets)
        except re.error as e:
            raise ConfigError(f"config key lora.targets = {c.lora.targets!r} is not a regex ({e})") from e
    _one_of("data.format", c.data.format, FORMATS)
    _one_of("data.too_long", c.data.too_long, TOO_LONG)
    if any(not isinstance(w, int | float) or w < 0 for w in c.data.weights) or (
        c.data.weights and not sum(c.data.weights)
    ):
        raise ConfigError(
            f"config key data.weights = {c.data.weights!r} must be non-negative numbers, not all 0"
        )
    _one_of("data.loss_on", c.data.loss_on, ("assistant", "all"))
    _positive("data.seq_len", c.data.seq_len)
    _positive("data.pad_to_multiple_of", c.data.pad_to_multiple_of, zero_ok=True)
    _positive("data.pack_window", c.data.pack_window, zero_ok=True)
    _positive("data.workers", c.data.workers, zero_ok=True)
    if c.data.streaming:
        if not c.train.max_steps:
            raise ConfigError(
                "config key data.streaming = True needs train.max_steps: a stream has no known length"
            )
        if c.data.format == "classification" or c.data.eval_fraction or c.data.weights or c.data.dedupe:
            raise ConfigError(
                "config key data.streaming = True reads text, chat and instruction sources in order; "
                "unset data.eval_fraction, data.weights and data.dedupe (give data.eval for evaluation) "
                "and do not stream classification data"
            )
    if c.data.pad_to_multiple_of and c.data.format != "classification":
        raise ConfigError(
            f"config key data.pad_to_multiple_of = {c.data.pad_to_multiple_of} applies to "
            "data.format='classification' (language-model rows are full); set it to 0"
        )
    if not 0 <= c.data.eval_fraction < 1:
        raise ConfigError(f"config key data.eval_fraction = {c.data.eval_fraction} must be in [0, 1)")
    for key in ("batch_size", "num_epochs", "grad_accum_steps", "log_every"):
        _positive(f"train.{key}", c.train[key])
    _positive("train.max_steps", c.train.max_steps, zero_ok=True)
    _positive("train.stop_timeout_s", c.train.stop_timeout_s, zero_ok=True)
    _one_of("optimizer.name", c.optimizer.name, OPTIMIZERS)
    _one_of("optimizer.schedule", c.optimizer.schedule, SCHEDULES)
    _positive("optimizer.lr", c.optimizer.lr)
    _positive("data.max_train_records", c.data.max_train_records, zero_ok=True)
    for key, value in (
        ("optimizer.warmup_ratio", c.optimizer.warmup_ratio),
        ("model.dropout", c.model.dropout),
    ):
        if not 0 <= value < 1:
            raise ConfigError(f"config key {key} = {value} must be in [0, 1)")
    for key in ("warmup_steps", "weight_decay", "clip_norm", "momentum", "min_lr_ratio"):
        _positive(f"optimizer.{key}", c.optimizer[key], zero_ok=True)
    if not 0 < c.optimizer.lr_layer_decay <= 1:
        raise ConfigError(
            f"config key optimizer.lr_layer_decay = {c.optimizer.lr_layer_decay} must be in (0, 1]"
        )
    _check_patterns(c)
    for key in ("every_steps", "keep"):
        _positive(f"checkpoint.{key}", c.checkpoint[key], zero_ok=key == "every_steps")
    for key in ("every_steps", "max_batches", "batch_size", "patience", "min_delta"):
        _positive(f"eval.{key}", c.eval[key], zero_ok=True)
    _one_of("checkpoint.best_mode", c.checkpoint.best_mode, ("max", "min"))
    _positive("checkpoint.best_keep", c.checkpoint.best_keep)
    if (c.eval.patience or c.checkpoint.load_best_at_end) and not c.checkpoint.best_metric:
        raise ConfigError(
            "config keys eval.patience / checkpoint.load_best_at_end need checkpoint.best_metric "
            "(the eval metric to follow, e.g. 'accuracy' or 'loss')"
        )
    if c.eval.metrics:
        from jaxtune import metrics

        if c.model.task != "sequence_classification":
            raise ConfigError(
                f"config key eval.metrics = {c.eval.metrics!r} applies to classifiers "
                "(model.task = 'sequence_classification'); remove it"
            )
        try:
            metrics.user_metrics(c.eval.metrics)
        except ValueError as e:
            raise ConfigError(f"config key eval.metrics: {e}") from e
    _one_of("export.checkpoint", c.export.checkpoint, ("best", "last"))
    if c.export.dtype:
        _one_of("export.dtype", c.export.dtype, DTYPES)
    micro, rem = divmod(c.train.batch_size, c.train.grad_accum_steps)
    if rem:
        raise ConfigError(
            f"config key train.batch_size = {c.train.batch_size} is not divisible by "
            f"train.grad_accum_steps = {c.train.grad_accum_steps}; make the batch a multiple of it"
        )
    if num_devices is not None:
        sizes = mesh_shape(c, num_devices)
        shards = sizes["data"] * sizes["fsdp"]
        for key, batch in (
            ("train.batch_size / grad_accum_steps", micro),
            ("eval.batch_size", c.eval.batch_size),
        ):
            if batch % shards:
                raise ConfigError(
                    f"config key {key} = {batch} is not divisible by the {shards} data shards "
                    f"(mesh.data x mesh.fsdp); use a multiple of {shards}"
                )


def _check_patterns(c):
    import re

    for i, item in enumerate(c.optimizer.lr_multipliers):
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], int | float)):
            raise ConfigError(
                f"config key optimizer.lr_multipliers[{i}] = {item!r} must be a (regex, multiplier) pair"
            )
    patterns = [("optimizer.lr_multipliers", p[0]) for p in c.optimizer.lr_multipliers]
    patterns += [("optimizer.frozen", p) for p in c.optimizer.frozen]
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(
                f"config key {key} has {pattern!r}, which is not a regular expression ({e})"
            ) from e
