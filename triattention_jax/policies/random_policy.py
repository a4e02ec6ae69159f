"""A floor for comparisons: keeps a uniformly random subset (plus whatever is protected)."""

from __future__ import annotations

import jax

from triattention_jax.cache import KVCache
from triattention_jax.policies.base import EvictionPolicy, RoundContext, policy_dataclass, register


@policy_dataclass
class RandomEviction(EvictionPolicy):
    budget: int = 2048
    protect_prompt: bool = False
    window: int = 0
    seed: int = 0

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        # A fresh draw per compaction: the key depends on how far decoding has got.
        key = jax.random.fold_in(jax.random.key(self.seed), context.position.max())
        return jax.random.uniform(key, (cache.num_layers, *cache.pos[0].shape))


register("random", RandomEviction)
