"""Full attention: every token keeps its slot; the buffer is sized for the whole sequence."""

from __future__ import annotations

from typing import Any

from triattention_jax.cache import KVCache
from triattention_jax.model import MIN_ATTENTION_CHUNK
from triattention_jax.policies.base import KVPolicy, PolicySettings, RoundContext, policy_dataclass, register


@policy_dataclass
class FullAttention(KVPolicy):
    @classmethod
    def from_settings(cls, model: Any, settings: PolicySettings) -> "FullAttention":
        return cls()

    def num_slots(self, prompt_slots: int, max_new_tokens: int, divide_length: int) -> int:
        rounds = -(-max_new_tokens // divide_length)
        # A multiple of the attention chunk, so decoding reads only the filled chunks.
        return -(-(prompt_slots + rounds * divide_length) // MIN_ATTENTION_CHUNK) * MIN_ATTENTION_CHUNK

    def fit_prefill(self, cache: KVCache, num_slots: int, context: RoundContext) -> KVCache:
        return cache.resized(num_slots)

    def before_round(self, cache: KVCache, divide_length: int, context: RoundContext) -> KVCache:
        return cache


register("full", FullAttention)
