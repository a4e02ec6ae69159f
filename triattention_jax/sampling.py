"""Token sampling: greedy, temperature, top-k and top-p, as a frozen, hashable config."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from triattention_jax.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampler:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits (batch, vocab) float32 -> tokens (batch,) int32."""
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        if self.top_k:
            logits = _keep_top(logits, lambda kept: jnp.sum(kept, axis=-1) >= self.top_k)
        if self.top_p < 1:
            probs = jax.nn.softmax(logits, axis=-1)
            logits = _keep_top(logits, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1) >= self.top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _keep_top(logits: jax.Array, enough: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Masks all but the highest logits: keeps those >= τ for the largest τ where `enough` holds.

    τ is found per row by bisection over the float32 values' order-preserving uint32 codes,
    so it is exact after 32 halvings; unlike a sort or `lax.top_k` over the vocabulary, each
    halving is one elementwise pass, which is much cheaper on CPU and GPU.
    """
    bits = jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.uint32)
    codes = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))
    low, high = jnp.min(codes, axis=-1), jnp.max(codes, axis=-1)

    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low + 1) // 2
        ok = enough(codes >= mid[:, None])
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid - 1)

    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    return jnp.where(codes >= low[:, None], logits, -jnp.inf)
