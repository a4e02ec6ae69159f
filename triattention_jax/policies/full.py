"""Full attention: every token keeps its slot in one buffer allocated at prefill."""

from __future__ import annotations

from typing import ClassVar

from triattention_jax.cache import KVCache
from triattention_jax.policies.base import KVPolicy, RoundContext, policy_dataclass, register


@policy_dataclass
class FullAttention(KVPolicy):
    """One buffer of prompt bucket + generated slots, allocated once. A decode step on a GPU
    reads only its filled slots (`Transformer.extend`'s length-aware kernel), so its cost
    follows the filled length; where the kernel does not apply (the CPU, a mesh, prefill and
    teacher-forced blocks) attention reads the whole buffer."""

    evicts: ClassVar[bool] = False

    def num_slots(self, prompt_slots: int, max_new_tokens: int, divide_length: int) -> int:
        return prompt_slots + -(-max_new_tokens // divide_length) * divide_length

    def fit_prefill(self, cache: KVCache, num_slots: int, context: RoundContext) -> KVCache:
        return cache.resized(num_slots)

    def before_round(self, cache: KVCache, divide_length: int, context: RoundContext) -> KVCache:
        return cache


register("full", FullAttention)
