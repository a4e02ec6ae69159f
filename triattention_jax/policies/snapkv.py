"""SnapKV at decoding time (SPEC 6): keys ranked by the attention the last `window` queries
pay them, max-pooled over neighbouring slots, max over the GQA group; the window is kept."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from triattention_jax.cache import EMPTY_POSITION, KVCache
from triattention_jax.policies.base import (
    EvictionPolicy,
    RoundContext,
    last_prompt_entries,
    policy_dataclass,
    register,
    slide_window,
)


@policy_dataclass
class SnapKV(EvictionPolicy):
    """Carries the last `window` post-RoPE queries in `cache.state`, updated every step."""

    observes: ClassVar[frozenset[str]] = frozenset({"rope_queries"})

    budget: int = 2048
    protect_prompt: bool = False
    window: int = 8
    pool_kernel: int = 7

    def start(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        return _with_state(cache, *last_prompt_entries(out.rope_queries, positions, self.window, cache.dtype))

    def observe(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        window = (cache.state["window_queries"], cache.state["window_positions"])
        return _with_state(cache, *slide_window(*window, out.rope_queries, positions, self.window))

    def window_attention(self, cache: KVCache) -> jax.Array:
        """Mean attention of the window queries over the cache, max over the GQA group,
        max-pooled over `pool_kernel` neighbouring slots: (layers, batch, kv_heads, slots)."""
        L, B, W, H, hd = cache.state["window_queries"].shape
        K = cache.pos[0].shape[1]
        query_pos = cache.state["window_positions"][:, None, None, :, None]
        valid_queries = jnp.maximum(jnp.sum(cache.state["window_positions"] != EMPTY_POSITION, axis=1), 1)

        def one_layer(queries: jax.Array, keys: jax.Array, key_pos: jax.Array) -> jax.Array:
            queries = queries.reshape(B, W, K, H // K, hd).astype(jnp.float32)
            logits = jnp.einsum("bwkgd,bksd->bkgws", queries, keys.astype(jnp.float32)) * hd**-0.5
            key_pos = key_pos[:, :, None, None, :]
            visible = (key_pos != EMPTY_POSITION) & (key_pos <= query_pos) & (query_pos != EMPTY_POSITION)
            weights = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1), 0.0)
            return jnp.max(jnp.sum(weights, axis=3), axis=2) / valid_queries[:, None, None]

        importance = jnp.stack(
            [
                one_layer(queries, layer.rope_keys, layer.pos)
                for queries, layer in zip(cache.state["window_queries"], cache.layers())
            ]
        )
        return jax.lax.reduce_window(
            importance, -jnp.inf, jax.lax.max, (1, 1, 1, self.pool_kernel), (1, 1, 1, 1), "SAME"
        )

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        return self.window_attention(cache)


# The recent queries' logical axes, for sharding them with the cache.
STATE_AXES = {
    "window_queries": ("layers", "batch", "window", "q_heads", "head_dim"),
    "window_positions": ("batch", "window"),
}


def _with_state(cache: KVCache, queries: jax.Array, window_positions: jax.Array) -> KVCache:
    return cache.with_state(
        {"window_queries": queries, "window_positions": window_positions.astype(jnp.int32)}, STATE_AXES
    )


register("snapkv", SnapKV)
