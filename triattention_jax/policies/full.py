"""Full attention: every token keeps its slot; the buffer is sized for the whole sequence."""

from __future__ import annotations

import dataclasses

from triattention_jax.cache import KVCache
from triattention_jax.policies.base import KVPolicy, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullAttention(KVPolicy):
    def num_slots(self, prompt_slots: int, max_new_tokens: int, divide_length: int) -> int:
        rounds = -(-max_new_tokens // divide_length)
        return prompt_slots + rounds * divide_length

    def before_round(self, cache: KVCache, divide_length: int) -> KVCache:
        return cache


register("full", FullAttention)
