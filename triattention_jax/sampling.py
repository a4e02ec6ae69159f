"""Token sampling: greedy, temperature, top-k and top-p, as a frozen, hashable config."""

from __future__ import annotations

import dataclasses

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
            kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1:
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p: a token stays when the mass
            # before it is still below top_p.
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            cutoff = jnp.min(jnp.where(mass_before < self.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
