"""KV-cache policies, one per file; importing this package registers them all."""

from triattention_jax.policies.base import KVPolicy, policy_class, policy_names
from triattention_jax.policies.full import FullAttention

__all__ = ["KVPolicy", "FullAttention", "policy_class", "policy_names"]
