"""R-KV (SPEC 6): SnapKV-style importance minus redundancy among keys, 0.1·importance − 0.9·redundancy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from triattention_jax.cache import KVCache
from triattention_jax.policies.base import (
    SIMILARITY_THRESHOLD,
    RoundContext,
    key_redundancy,
    policy_dataclass,
    register,
)
from triattention_jax.policies.snapkv import SnapKV


@policy_dataclass
class RKV(SnapKV):
    budget: int = 2048
    protect_prompt: bool = False
    window: int = 8
    pool_kernel: int = 7
    similarity_threshold: float = SIMILARITY_THRESHOLD
    importance_weight: float = 0.1

    def redundancy(self, cache: KVCache) -> jax.Array:
        """`key_redundancy` of every layer: (layers, batch, kv_heads, slots)."""
        return jnp.stack(
            [key_redundancy(layer.rope_keys, layer.pos, self.similarity_threshold) for layer in cache.layers()]
        )

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        return self.importance_weight * self.window_attention(cache) - (1 - self.importance_weight) * self.redundancy(
            cache
        )


register("rkv", RKV)
