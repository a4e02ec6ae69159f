"""Full attention: every token keeps its slot; the buffer grows with the sequence."""

from __future__ import annotations

from typing import ClassVar

from triattention_jax.cache import KVCache
from triattention_jax.policies.base import KVPolicy, RoundContext, policy_dataclass, register

# Below this many slots a buffer is cheap to read whole, and one size saves recompiles.
MIN_GROWN_SLOTS = 1024


@policy_dataclass
class FullAttention(KVPolicy):
    """Attention reads the whole buffer, so the buffer follows the filled length: before each
    round it grows to the next size of the form 2^e or 1.5 * 2^e that holds the round (at
    most a third unused, two compiled sizes per doubling), capped at the whole sequence."""

    evicts: ClassVar[bool] = False

    def num_slots(self, prompt_slots: int, max_new_tokens: int, divide_length: int) -> int:
        return prompt_slots + -(-max_new_tokens // divide_length) * divide_length

    def fit_prefill(self, cache: KVCache, num_slots: int, context: RoundContext) -> KVCache:
        return cache

    def prefill_slots(self, prompt_slots: int, num_slots: int) -> int:
        return prompt_slots

    def round_slots(self, num_slots: int, filled: int, divide_length: int, max_slots: int) -> int:
        needed = filled + divide_length
        granule = max(1, 1 << ((needed - 1).bit_length() - 2))
        return max(num_slots, min(max_slots, max(MIN_GROWN_SLOTS, -(-needed // granule) * granule)))

    def before_round(self, cache: KVCache, divide_length: int, context: RoundContext) -> KVCache:
        return cache


register("full", FullAttention)
