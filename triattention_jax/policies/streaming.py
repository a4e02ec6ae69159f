"""StreamingLLM: the first `sinks` tokens and the most recent ones (SPEC 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from triattention_jax.cache import KVCache
from triattention_jax.policies.base import EvictionPolicy, RoundContext, policy_dataclass, register


@policy_dataclass
class StreamingLLM(EvictionPolicy):
    budget: int = 2048
    protect_prompt: bool = False
    window: int = 0
    sinks: int = 4

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        positions = cache.stacked("pos")
        return jnp.where(positions < self.sinks, jnp.inf, positions.astype(jnp.float32))


register("streaming", StreamingLLM)
