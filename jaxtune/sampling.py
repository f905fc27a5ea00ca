"""How a generation picks each next token from the logits: greedy or sampled, in jit.

The order is transformers': the repetition penalty on the raw logits, then the temperature, then
top-k, then top-p (nucleus), then a draw. A :class:`Sampler` is static (hashable) so each choice
compiles to only the work it needs: greedy decoding sorts nothing, a run without a repetition
penalty carries no record of the tokens seen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """``temperature`` 0 is greedy (argmax); above 0 tokens are drawn from the softmax of the logits
    over it, kept to the ``top_k`` most likely (0 = all) and to the smallest set whose probability
    reaches ``top_p`` (1 = all). ``repetition_penalty`` > 1 makes tokens already in the row (prompt
    included) less likely, as transformers does: a positive logit is divided by it, a negative one
    multiplied."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "above 0 (1 = off)"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: must be {want}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0

    def __call__(self, logits_bv, key, seen_bv=None):
        """The next token of each row [b] (int32)."""
        logits = logits_bv.astype(jnp.float32)
        if self.penalised:
            p = jnp.float32(self.repetition_penalty)
            logits = jnp.where(seen_bv, jnp.where(logits < 0, logits * p, logits / p), logits)
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = filter_logits(logits / jnp.float32(self.temperature), self.top_k, self.top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


GREEDY = Sampler()


def filter_logits(logits_bv, top_k: int = 0, top_p: float = 1.0):
    """Logits with every token outside the top-k and outside the top-p nucleus set to -inf. Ties with
    the k-th logit stay in, as in transformers; the most likely token always stays."""
    if top_k and top_k < logits_bv.shape[-1]:
        kth = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if top_p < 1.0:
        order = jnp.argsort(-logits_bv, axis=-1)
        sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token stays when the tokens before it hold less than top_p: the smallest set reaching it.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < jnp.float32(top_p)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(keep_sorted)
        logits_bv = jnp.where(keep, logits_bv, -jnp.inf)
    return logits_bv
