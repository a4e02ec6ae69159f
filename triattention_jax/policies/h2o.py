"""H2O (SPEC 6): heavy hitters by the attention each key has received so far, plus a recent window."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from triattention_jax.cache import KVCache
from triattention_jax.policies.base import EvictionPolicy, RoundContext, policy_dataclass, register


@policy_dataclass
class H2O(EvictionPolicy):
    """Accumulates, per slot, the attention its key received (summed over the GQA group) from
    the prompt and from every decode step, in `cache.slot_stats["attention"]`."""

    observes: ClassVar[frozenset[str]] = frozenset({"attention"})

    budget: int = 2048
    protect_prompt: bool = False
    window: int = 1024

    @classmethod
    def default_window(cls, budget: int) -> int:
        """Half the budget is the recent window (the paper's split of heavy hitters and recent tokens)."""
        return budget // 2

    def start(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        return dataclasses.replace(cache, slot_stats={"attention": out.attention_new})

    def observe(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        accumulated = cache.slot_stats["attention"] + out.attention_cache
        new_slots = cache.cursor - out.attention_new.shape[-1]
        accumulated = jax.lax.dynamic_update_slice(accumulated, out.attention_new, (0, 0, 0, new_slots))
        return dataclasses.replace(cache, slot_stats={"attention": accumulated})

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        return cache.slot_stats["attention"]


register("h2o", H2O)
