"""TriAttention KV-cache compression for Llama / Qwen decoders in JAX."""

from triattention_jax.cache import KVCache, init_cache
from triattention_jax.checkpoint import LoadedModel, load_model, load_transformer
from triattention_jax.config import ModelConfig, RopeConfig
from triattention_jax.errors import UserError
from triattention_jax.generate import GenerationResult, generate, teacher_force
from triattention_jax.model import Transformer
from triattention_jax.policies import EvictionPolicy, FullAttention, KVPolicy, TriAttention
from triattention_jax.prompts import encode_prompts
from triattention_jax.sampling import Sampler
from triattention_jax.scoring import FrequencyStats
from triattention_jax.stats import load_stats, save_stats

__all__ = [
    "EvictionPolicy",
    "FrequencyStats",
    "TriAttention",
    "load_stats",
    "save_stats",
    "FullAttention",
    "GenerationResult",
    "KVCache",
    "KVPolicy",
    "LoadedModel",
    "ModelConfig",
    "RopeConfig",
    "Sampler",
    "Transformer",
    "UserError",
    "encode_prompts",
    "generate",
    "init_cache",
    "load_model",
    "load_transformer",
    "teacher_force",
]
