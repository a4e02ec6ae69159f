"""KV-cache policies, one per file; importing this package registers them all."""

from triattention_jax.policies.base import EvictionPolicy, KVPolicy, RoundContext, policy_class, policy_names
from triattention_jax.policies.expected_attention import ExpectedAttention
from triattention_jax.policies.expected_attention_calibrated import ExpectedAttentionCalibrated
from triattention_jax.policies.full import FullAttention
from triattention_jax.policies.h2o import H2O
from triattention_jax.policies.random_policy import RandomEviction
from triattention_jax.policies.rkv import RKV
from triattention_jax.policies.snapkv import SnapKV
from triattention_jax.policies.streaming import StreamingLLM
from triattention_jax.policies.triattention import TriAttention
from triattention_jax.policies.triattention_fit import TriAttentionFit

__all__ = [
    "EvictionPolicy",
    "ExpectedAttention",
    "ExpectedAttentionCalibrated",
    "FullAttention",
    "H2O",
    "KVPolicy",
    "RKV",
    "RandomEviction",
    "RoundContext",
    "SnapKV",
    "StreamingLLM",
    "TriAttention",
    "TriAttentionFit",
    "policy_class",
    "policy_names",
]
