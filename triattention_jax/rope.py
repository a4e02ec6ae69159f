"""Rotary position embeddings in Hugging Face's split-half layout.

Band f pairs dimension f with dimension f + head_dim/2; as a complex number it is
x[f] + i·x[f + head_dim/2], and RoPE at position p multiplies it by e^{i·ω_f·p}.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Returns (ω_f for f < head_dim/2 as float32, attention_scaling), following transformers."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
    attention_scaling = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_inverse_frequencies(rope, inv_freq)
    elif rope.rope_type == "yarn":
        inv_freq, attention_scaling = _yarn_inverse_frequencies(rope, head_dim)
    return inv_freq.astype(np.float32), attention_scaling


def _llama3_inverse_frequencies(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.power(np.float32(rope.theta), np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, attention_scaling: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of ω_f·p, float32, shape positions.shape + (head_dim/2,)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x (..., head_dim) by angles whose cos/sin have shape (..., head_dim/2).

    cos/sin are cast to x's dtype first, as transformers does, so bfloat16 matches it.
    """
    half = x.shape[-1] // 2
    cos = jnp.concatenate([cos, cos], axis=-1).astype(x.dtype)
    sin = jnp.concatenate([sin, sin], axis=-1).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def band_power(x: jax.Array) -> jax.Array:
    """|x_f|² of each RoPE band f, the pair (x[f], x[f + head_dim/2]) that rotates together:
    (..., head_dim) -> (..., head_dim/2), float32. Rotation leaves it unchanged."""
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    return x[..., :half] ** 2 + x[..., half:] ** 2


@dataclasses.dataclass(frozen=True)
class Rotation:
    """A model's RoPE as hashable data (a static field of a pytree): ω_f per band and the
    magnitude factor, for rotating keys that were cached before RoPE (see `cache.CacheLayer`)."""

    inv_freq: tuple[float, ...]
    attention_scaling: float

    @classmethod
    def of(cls, rope: RopeConfig, head_dim: int) -> Rotation:
        inv_freq, attention_scaling = inverse_frequencies(rope, head_dim)
        return cls(tuple(float(f) for f in inv_freq), float(attention_scaling))

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`rope_cos_sin` at `positions` (negative ones as 0)."""
        return rope_cos_sin(jnp.maximum(positions, 0), jnp.asarray(self.inv_freq, jnp.float32), self.attention_scaling)

    def apply(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x (..., head_dim) rotated to `positions` (x.shape[:-1] or broadcast to it), in float32."""
        return apply_rope(x.astype(jnp.float32), *self.cos_sin(positions))
