"""Random weights at real architectures' shapes, for speed runs: the presets, the model under
each cache layout, random TriAttention statistics."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.checkpoints.stats import CalibrationResult, FitResult
from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import LAYER_WEIGHTS, Transformer, weight_specs
from triattention_jax.policies.triattention_fit import FEATURES
from triattention_jax.scoring import FrequencyStats
from triattention_jax.slim import KV_CACHE_MODES, SlimReport, slim_transformer

# HF config.json fields of real architectures, for random-weight speed runs.
_QWEN3 = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "head_dim": 128,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
}
PRESETS = {
    "qwen3-8b": {
        **_QWEN3,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "qwen3-1.7b": {
        **_QWEN3,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "llama3.1-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "llama2-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}
# Multi-head attention at the tiny shape, for the K-only (slim) cache on the CPU.
PRESETS["tiny-mha"] = {**PRESETS["tiny"], "num_key_value_heads": 4, "head_dim": 16}


def preset_config(preset: str) -> dict[str, Any]:
    if preset in PRESETS:
        return PRESETS[preset]
    if os.path.isfile(preset):
        return json.loads(open(preset).read())
    raise UserError(f"--preset {preset!r} is neither one of {', '.join(PRESETS)} nor a config.json file")


def random_transformer(preset: str, dtype: str, seed: int = 0) -> Transformer:
    """A model of the preset's shape with random weights generated on the device, layer by
    layer (no stacked temporaries that would leave the device memory fragmented)."""
    config = ModelConfig.from_hf(preset_config(preset))
    key = jax.random.key(seed)

    def draw(name: str, index: int, shape: tuple[int, ...]) -> jax.Array:
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        return 0.02 * jax.random.normal(jax.random.fold_in(key, index), shape, dtype)

    weights = {}
    for index, (name, (shape, _)) in enumerate(sorted(weight_specs(config).items())):
        if name in LAYER_WEIGHTS:
            weights[name] = [
                draw(name, index * config.num_layers + layer, shape[1:]) for layer in range(config.num_layers)
            ]
        else:
            weights[name] = draw(name, index, shape)
    return Transformer(config, weights, dtype=dtype)


def random_stats(transformer: Transformer, seed: int = 0) -> FrequencyStats:
    """Statistics of the model's shape with random query centres (speed does not depend on them)."""
    c = transformer.config
    shape = (c.num_layers, c.num_heads, c.head_dim // 2)
    keys = jax.random.split(jax.random.key(seed), 2)
    mean_re, mean_im = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    return FrequencyStats(q_mean_real=mean_re, q_mean_imag=mean_im, q_abs_mean=1.5 * jnp.sqrt(mean_re**2 + mean_im**2))


def random_calibration(transformer: Transformer, seed: int = 0) -> CalibrationResult:
    """`random_stats` with a random band variance, as a calibration (what every statistics-driven
    method, expected_attention_calibrated included, can be built from)."""
    c = transformer.config
    band_var = np.random.default_rng(seed).uniform(0.1, 1.0, size=(c.num_layers, c.num_heads, c.head_dim // 2))
    return CalibrationResult(
        stats=random_stats(transformer, seed), metadata={"source": "random"}, q_band_var=band_var.astype(np.float32)
    )


def random_fit(transformer: Transformer, seed: int = 0) -> FitResult:
    """A fitted scorer of the model's shape with random weights (speed does not depend on them)."""
    c = transformer.config
    rng = np.random.default_rng(seed)
    return FitResult(
        weights=rng.normal(size=(c.num_layers, c.num_heads, len(FEATURES))).astype(np.float32),
        q_band_var=rng.uniform(0.1, 1.0, size=(c.num_layers, c.num_heads, c.head_dim // 2)).astype(np.float32),
        metadata={"features": list(FEATURES)},
    )


def cache_variants(
    transformer: Transformer, modes: list[str], *, random_weights: bool, value_map: str = "auto"
) -> dict[str, tuple[Transformer, SlimReport | None]]:
    """kv_cache mode -> the model to time with it and, for slim, what its conversion measured.
    Speed does not depend on the values, so random weights' W_K is not held to the
    conditioning threshold; a checkpoint's is. value_map: see `slim_transformer`."""
    unknown = set(modes) - set(KV_CACHE_MODES)
    if unknown or not modes:
        raise UserError(f"--kv_cache takes {', '.join(KV_CACHE_MODES)}; got {', '.join(modes) or 'nothing'}")
    max_cond = float("inf") if random_weights else None
    return {
        mode: (transformer, None)
        if mode == "standard"
        else slim_transformer(transformer, max_cond=max_cond, value_map=value_map)
        for mode in modes
    }
