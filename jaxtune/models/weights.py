"""How one Hugging Face tensor becomes one of our parameters, and back.

A family's weight table pairs a Hugging Face key template with our parameter path and one of the
transforms below. Import and export use the same table and the same transform, inverted.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """transpose: HF stores [out, in] (torch Linear) where we store [in..., out...].
    in_dims: how many leading dims of our parameter are the input side (2 for [heads, head_dim, d]).
    flat: HF stores the parameter flattened to one dimension (biases, norm scales)."""

    transpose: bool = False
    in_dims: int = 1
    flat: bool = False

    def hf_shape(self, ours: tuple) -> tuple:
        if self.flat:
            return (math.prod(ours),)
        rows, cols = math.prod(ours[: self.in_dims]), math.prod(ours[self.in_dims :])
        return (cols, rows) if self.transpose else (rows, cols)

    def to_ours(self, hf: np.ndarray, shape: tuple) -> np.ndarray:
        return (hf.T if self.transpose else hf).reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        x = ours.reshape(self.hf_shape(ours.shape)[::-1] if self.transpose else self.hf_shape(ours.shape))
        return np.ascontiguousarray(x.T) if self.transpose else x


IDENT = Transform()
FLAT = Transform(flat=True)
LINEAR = Transform(transpose=True)  # torch nn.Linear weight
LINEAR_IN2 = Transform(transpose=True, in_dims=2)  # o_proj: our [heads, head_dim, d]
CONV1D = Transform()  # GPT-2 Conv1D weight, already [in, out]
CONV1D_IN2 = Transform(in_dims=2)


def dense(theirs: str, ours: str, tx: Transform = LINEAR) -> tuple:
    """Table entries of a layer with a bias: ``theirs.weight`` / ``theirs.bias`` -> ``ours.kernel`` /
    ``ours.bias``."""
    return ((f"{theirs}.weight", f"{ours}.kernel", tx), (f"{theirs}.bias", f"{ours}.bias", FLAT))


def layer_norm(theirs: str, ours: str) -> tuple:
    """Table entries of a LayerNorm: scale and bias."""
    return ((f"{theirs}.weight", f"{ours}.weight", FLAT), (f"{theirs}.bias", f"{ours}.bias", FLAT))
