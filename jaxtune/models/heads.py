"""Tasks and the heads that serve them, shared by encoder and decoder families.

A :class:`Task` says what a model outputs: next-token logits (``causal_lm``), one row of label logits
per sequence (``sequence_classification``), per token (``token_classification``), or the bare
backbone's last hidden states (``base``). Heads are built and initialised the way transformers builds
them (normal(initializer_range) kernels, zero biases), so a fresh head matches what
``AutoModelFor*.from_pretrained`` would have created.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtune.errors import ModelError
from jaxtune.models import layers

TASKS = ("causal_lm", "sequence_classification", "token_classification", "base")
SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)
CLASSIFICATION = ("sequence_classification", "token_classification")

# transformers class-name suffix per task; a family supplies the prefix (``Llama``, ``Bert``, ...).
ARCHITECTURE_SUFFIX = {
    "causal_lm": "ForCausalLM",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "base": "Model",
}


@dataclasses.dataclass(frozen=True)
class Labels:
    """A classifier's label space: label names by id (id2label) and the problem type. A regression
    has one name per output value (``LABEL_0`` for one value, as transformers names it). Hashable, so a
    task holding it can sit in a module's static structure."""

    names: tuple[str, ...]
    problem_type: str = SINGLE_LABEL

    def __post_init__(self):
        if not self.names:
            raise ModelError("a classification task needs at least one label (num_labels >= 1)")
        if len(set(self.names)) != len(self.names):
            raise ModelError(f"id2label has repeated label names: {list(self.names)}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ModelError(f"problem_type {self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")

    @property
    def num_labels(self) -> int:
        return len(self.names)


ONE_VALUE = Labels(("LABEL_0",), REGRESSION)  # a regression on one number per example


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model outputs: the task's name and, for a classifier, its label space."""

    name: str = "causal_lm"
    space: Labels | None = None

    def __post_init__(self):
        if self.name not in TASKS:
            raise ModelError(f"unknown task {self.name!r}; use one of {', '.join(TASKS)}")
        if (self.name in CLASSIFICATION) != (self.space is not None):
            need = "needs a label space" if self.name in CLASSIFICATION else "takes no labels"
            raise ModelError(f"task {self.name} {need}")

    @property
    def labels(self) -> tuple:
        """Label names by id; empty for a task without labels."""
        return self.space.names if self.space else ()

    @property
    def problem_type(self) -> str:
        return self.space.problem_type if self.space else ""

    @property
    def num_labels(self) -> int:
        return len(self.labels)


CAUSAL_LM = Task()


def task_from_architecture(architectures, default: str) -> str:
    """The task a checkpoint was saved for, from config.json's ``architectures``."""
    name = (architectures or [""])[0]
    for task, suffix in ARCHITECTURE_SUFFIX.items():
        if task != "base" and name.endswith(suffix):
            return task
    if name.endswith("LMHeadModel"):  # GPT-2's causal LM class
        return "causal_lm"
    return default


def labels_from(num_labels=None, id2label=None, hf_config=None) -> tuple:
    """Label names by id, from ``id2label`` (dict or list), else ``num_labels`` (``LABEL_i`` as
    transformers names them), else the checkpoint's config."""
    if id2label is not None:
        if isinstance(id2label, dict):
            ids = sorted(int(i) for i in id2label)
            if ids != list(range(len(ids))):
                raise ModelError(f"id2label keys must be 0..{len(ids) - 1}, got {ids}")
            names = tuple(str(id2label[i] if i in id2label else id2label[str(i)]) for i in ids)
        else:
            names = tuple(str(x) for x in id2label)
        if num_labels is not None and num_labels != len(names):
            raise ModelError(f"num_labels={num_labels} disagrees with id2label ({len(names)} labels)")
        if len(set(names)) != len(names):
            raise ModelError(f"id2label has repeated label names: {list(names)}")
        return names
    if num_labels is not None:
        if int(num_labels) < 1:
            raise ModelError(f"num_labels must be at least 1, got {num_labels}")
        return tuple(f"LABEL_{i}" for i in range(int(num_labels)))
    if hf_config is not None:
        id2label = hf_config.id2label
        return tuple(str(id2label[i]) for i in sorted(id2label))
    raise ModelError("a classification task needs num_labels or id2label")


def default_problem_type(labels: tuple) -> str:
    """transformers' rule: one output is regression, several are single-label classification."""
    return "regression" if len(labels) == 1 else "single_label_classification"


def config_fields(task: Task) -> dict:
    """The config.json entries transformers reads for a head."""
    if task.name not in CLASSIFICATION:
        return {}
    return {
        "id2label": {str(i): name for i, name in enumerate(task.labels)},
        "label2id": {name: i for i, name in enumerate(task.labels)},
        "problem_type": task.problem_type,
    }


def dense(d_in: int, d_out: int, out_name: str, bias: bool, std: float, *, rngs, dtype):
    """A head's dense layer. A d -> d layer names its output side ``mlp`` so that the two sides never
    map to the same mesh axis."""
    init = layers.normal(std)
    return layers.Linear(d_in, d_out, ("embed",), (out_name,), bias, init, rngs=rngs, dtype=dtype)


def last_token_index(input_ids_bt, attention_mask_bt, pad_token_id: int):
    """Index of the token a decoder classifies from, per row, as transformers picks it: the rightmost
    token that is not ``pad_token_id`` (handles left and right padding). With no pad token, the
    rightmost attended token, or the last one."""
    b, t = input_ids_bt.shape
    if pad_token_id >= 0:
        keep = input_ids_bt != pad_token_id
    elif attention_mask_bt is not None:
        keep = attention_mask_bt > 0
    else:
        return jnp.full((b,), t - 1)
    return jnp.argmax(jnp.arange(t) * keep, axis=-1)


def predictions(logits, problem_type: str):
    """What a classifier predicts from its logits ``[b, labels]``, as the metrics read it: label ids
    (single-label), the logits themselves (multi-label: a label is on above 0; regression with several
    outputs) or the values ``[b]`` (regression with one output). Works on jax and numpy arrays."""
    if problem_type == SINGLE_LABEL:
        return logits.argmax(-1)
    if problem_type == REGRESSION and logits.shape[-1] == 1:
        return logits[:, 0].astype(jnp.float32)
    return logits.astype(jnp.float32)


def probabilities(logits, problem_type: str):
    """Each label's probability (softmax; sigmoid for multi-label), or None for regression."""
    x = jnp.asarray(logits, jnp.float32)
    if problem_type == MULTI_LABEL:
        return jax.nn.sigmoid(x)
    if problem_type == SINGLE_LABEL:
        return jax.nn.softmax(x, axis=-1)
    return None
