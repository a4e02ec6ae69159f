"""TriAttention KV-cache compression for Llama / Qwen decoders in JAX.

The curated public API, resolved on first use: `import triattention_jax` (and a command line's
`--help`) does not pay for importing jax until something that needs it is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_PUBLIC = {
    "Calibration": "triattention_jax.calibration",
    "CalibrationResult": "triattention_jax.checkpoints.stats",
    "DecodeState": "triattention_jax.decoding",
    "EvictionPolicy": "triattention_jax.policies",
    "ExpectedAttention": "triattention_jax.policies",
    "FrequencyStats": "triattention_jax.scoring",
    "FullAttention": "triattention_jax.policies",
    "GenerationResult": "triattention_jax.decoding",
    "H2O": "triattention_jax.policies",
    "KVCache": "triattention_jax.cache",
    "KVPolicy": "triattention_jax.policies",
    "LoadedModel": "triattention_jax.checkpoints.store",
    "ModelConfig": "triattention_jax.config",
    "PolicySettings": "triattention_jax.methods",
    "RKV": "triattention_jax.policies",
    "RandomEviction": "triattention_jax.policies",
    "RopeConfig": "triattention_jax.config",
    "Sampler": "triattention_jax.sampling",
    "SnapKV": "triattention_jax.policies",
    "StreamingLLM": "triattention_jax.policies",
    "Transformer": "triattention_jax.model",
    "TriAttention": "triattention_jax.policies",
    "TriAttentionFit": "triattention_jax.policies",
    "UserError": "triattention_jax.errors",
    "build_policy": "triattention_jax.methods",
    "calibrate": "triattention_jax.calibration",
    "decode_round": "triattention_jax.decoding",
    "enable_compilation_cache": "triattention_jax.compilation_cache",
    "encode_prompts": "triattention_jax.prompts",
    "generate": "triattention_jax.decoding",
    "init_cache": "triattention_jax.cache",
    "load_model": "triattention_jax.checkpoints.store",
    "load_stats": "triattention_jax.checkpoints.stats",
    "load_transformer": "triattention_jax.checkpoints.hf",
    "make_mesh": "triattention_jax.sharding",
    "prefill": "triattention_jax.decoding",
    "save_stats": "triattention_jax.checkpoints.stats",
    "slim_transformer": "triattention_jax.slim",
    "stats_for_model": "triattention_jax.calibration",
    "teacher_force": "triattention_jax.decoding",
    "teacher_forced_round": "triattention_jax.decoding",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'triattention_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from triattention_jax.cache import KVCache, init_cache
    from triattention_jax.calibration import Calibration, calibrate, stats_for_model
    from triattention_jax.checkpoints.hf import load_transformer
    from triattention_jax.checkpoints.stats import CalibrationResult, load_stats, save_stats
    from triattention_jax.checkpoints.store import LoadedModel, load_model
    from triattention_jax.compilation_cache import enable_compilation_cache
    from triattention_jax.config import ModelConfig, RopeConfig
    from triattention_jax.decoding import (
        DecodeState,
        GenerationResult,
        decode_round,
        generate,
        prefill,
        teacher_force,
        teacher_forced_round,
    )
    from triattention_jax.errors import UserError
    from triattention_jax.methods import PolicySettings, build_policy
    from triattention_jax.model import Transformer
    from triattention_jax.policies import (
        H2O,
        RKV,
        EvictionPolicy,
        ExpectedAttention,
        FullAttention,
        KVPolicy,
        RandomEviction,
        SnapKV,
        StreamingLLM,
        TriAttention,
        TriAttentionFit,
    )
    from triattention_jax.prompts import encode_prompts
    from triattention_jax.sampling import Sampler
    from triattention_jax.scoring import FrequencyStats
    from triattention_jax.sharding import make_mesh
    from triattention_jax.slim import slim_transformer
