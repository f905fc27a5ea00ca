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

    def read(self, read_hf, shape: tuple, index: tuple) -> np.ndarray:
        """Our parameter's block ``index`` (one slice per dimension of ``shape``), reading from the
        Hugging Face tensor (``read_hf(hf_index)``) only the rows and columns that cover it: for each
        side (input dims, output dims) the range of its first sliced dimension, whole inner dims.
        FSDP and tensor parallelism slice whole rows, heads or columns, so nothing more is read."""
        groups = [range(len(shape))] if self.flat else [range(self.in_dims), range(self.in_dims, len(shape))]
        spans, chunk, post = [], [], []
        for dims in groups:
            first, inner = dims[0], [shape[d] for d in dims[1:]]
            step = math.prod(inner)
            sl = index[first]
            spans.append(slice(sl.start * step, sl.stop * step))
            chunk += [sl.stop - sl.start, *inner]
            post += [slice(None), *(index[d] for d in dims[1:])]
        if self.flat:
            block = read_hf(tuple(spans))
        elif self.transpose:
            block = read_hf((spans[1], spans[0])).T
        else:
            block = read_hf(tuple(spans))
        return block.reshape(chunk)[tuple(post)]

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
