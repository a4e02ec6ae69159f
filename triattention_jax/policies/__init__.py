"""KV-cache policies, one per file; importing this package registers them all."""

from triattention_jax.policies.base import EvictionPolicy, KVPolicy, PolicySettings, RoundContext, policy_class, policy_names
from triattention_jax.policies.full import FullAttention
from triattention_jax.policies.triattention import TriAttention

__all__ = [
    "EvictionPolicy",
    "FullAttention",
    "KVPolicy",
    "PolicySettings",
    "RoundContext",
    "TriAttention",
    "policy_class",
    "policy_names",
]
