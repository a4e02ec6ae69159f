"""R-KV (SPEC 6): SnapKV-style importance minus redundancy among keys, 0.1·importance − 0.9·redundancy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from triattention_jax.cache import EMPTY_POSITION, KVCache
from triattention_jax.policies.base import RoundContext, policy_dataclass, register
from triattention_jax.policies.snapkv import SnapKV


@policy_dataclass
class RKV(SnapKV):
    budget: int = 2048
    protect_prompt: bool = False
    window: int = 8
    pool_kernel: int = 7
    similarity_threshold: float = 0.5
    importance_weight: float = 0.1

    def redundancy(self, cache: KVCache) -> jax.Array:
        """Per key: softmax over keys of its mean cosine similarity to the others, where for
        each key the most recent other key that is highly similar to it does not count (the
        newest copy of a repeated key is the one kept). (layers, batch, kv_heads, slots)."""

        def one_layer(keys: jax.Array, pos: jax.Array) -> jax.Array:  # (B,K,S,hd), (B,K,S)
            ok = pos != EMPTY_POSITION
            unit = keys.astype(jnp.float32) / jnp.maximum(
                jnp.linalg.norm(keys.astype(jnp.float32), axis=-1, keepdims=True), 1e-6
            )
            similarity = jnp.einsum("bksd,bktd->bkst", unit, unit)
            pair = ok[..., :, None] & ok[..., None, :] & ~jnp.eye(keys.shape[2], dtype=bool)
            similarity = jnp.where(pair, similarity, 0.0)
            similar = similarity > self.similarity_threshold
            newest = jnp.argmax(jnp.where(similar, pos[..., None, :], -1), axis=-1)  # per row: newest similar key
            has_similar = jnp.any(similar, axis=-1)
            protect = (jnp.arange(keys.shape[2]) == newest[..., None]) & has_similar[..., None]
            similarity = jnp.where(protect, 0.0, similarity)
            rows = jnp.maximum(jnp.sum(ok, axis=-1, keepdims=True), 1)
            column_mean = jnp.sum(similarity, axis=-2) / rows
            return jax.nn.softmax(jnp.where(ok, column_mean, -jnp.inf), axis=-1)

        return jnp.stack([one_layer(layer.rope_keys, layer.pos) for layer in cache.layers()])

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        return self.importance_weight * self.window_attention(cache) - (1 - self.importance_weight) * self.redundancy(
            cache
        )


register("rkv", RKV)
