"""TriAttention key scores (SPEC section 4), in the post-RoPE form and in float32.

For query head h with calibrated centre qm_f (complex mean of pre-RoPE queries in band f) and
mean modulus qa_f, a cached post-RoPE key k'_f scored at the current position t0 gets

    S̃ = mean_δ Σ_f Re(qm_f · conj(k'_f) · e^{iω_f (t0+δ)})  +  Σ_f (qa_f − |qm_f|)·|k'_f|

The mean over offsets δ factors out of the sum: with c_f = mean_δ e^{iω_f δ} (precomputed in
float64), the trigonometric term is Σ_f Re(A_f · conj(k'_f)) with A_f = qm_f · c_f · e^{iω_f t0},
one dot product per key, and no key positions are needed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("per_head", "per_layer_per_head", "per_layer")
DEFAULT_OFFSETS = tuple(2**i for i in range(17))
STD_FLOOR = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FrequencyStats:
    """Calibrated pre-RoPE query statistics per (layer, query head, band), float32.

    q_mean_real, q_mean_imag: (layers, heads, head_dim/2), the complex mean E[q_f].
    q_abs_mean: (layers, heads, head_dim/2), the mean modulus E[|q_f|].
    """

    q_mean_real: jax.Array
    q_mean_imag: jax.Array
    q_abs_mean: jax.Array


def offset_phasors(inv_freq: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """c_f = mean over δ of e^{iω_f δ}, as float32 (2, head_dim/2) rows (real, imag), from float64."""
    angles = np.asarray(inv_freq, np.float64)[None, :] * np.asarray(offsets, np.float64)[:, None]
    return np.stack([np.cos(angles).mean(0), np.sin(angles).mean(0)]).astype(np.float32)


def key_score_terms(
    keys: jax.Array,
    stats: FrequencyStats,
    inv_freq: jax.Array,
    phasors: jax.Array,
    position: jax.Array,
    *,
    attention_scaling: float = 1.0,
    norm_weighting: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The two terms of S̃ for every key and query head: (trigonometric series, norm term).

    keys: (layers, batch, kv_heads, slots, head_dim) post-RoPE; position: (batch,) t0, the
    number of tokens processed; phasors: `offset_phasors(...)`. Each term float32
    (layers, batch, heads, slots). `norm_weighting=False` weights the norm term by qa_f
    instead of (1 − R_f)·qa_f.
    """
    L, B, K, S, hd = keys.shape
    half = hd // 2
    keys = keys.astype(jnp.float32)
    key_re, key_im = keys[..., :half], keys[..., half:]
    heads = stats.q_mean_real.shape[1]
    group = heads // K
    qm_re, qm_im = stats.q_mean_real.reshape(L, K, group, half), stats.q_mean_imag.reshape(L, K, group, half)
    qm_abs = jnp.sqrt(qm_re**2 + qm_im**2)
    norm_weight = stats.q_abs_mean.reshape(L, K, group, half) - (qm_abs if norm_weighting else 0.0)
    key_abs = jnp.sqrt(key_re**2 + key_im**2)
    norm = jnp.einsum("lkgf,lbksf->lbkgs", norm_weight, key_abs, precision=jax.lax.Precision.HIGHEST)
    angle = position.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (B, F)
    rot_re = jnp.cos(angle) * phasors[0] - jnp.sin(angle) * phasors[1]
    rot_im = jnp.cos(angle) * phasors[1] + jnp.sin(angle) * phasors[0]
    a_re = qm_re[:, None] * rot_re[None, :, None, None] - qm_im[:, None] * rot_im[None, :, None, None]
    a_im = qm_re[:, None] * rot_im[None, :, None, None] + qm_im[:, None] * rot_re[None, :, None, None]
    trig = jnp.einsum("lbkgf,lbksf->lbkgs", a_re, key_re, precision=jax.lax.Precision.HIGHEST)
    trig = trig + jnp.einsum("lbkgf,lbksf->lbkgs", a_im, key_im, precision=jax.lax.Precision.HIGHEST)
    scale = attention_scaling**2
    return (trig * scale).reshape(L, B, heads, S), (norm * scale).reshape(L, B, heads, S)


def key_scores(
    keys: jax.Array,
    stats: FrequencyStats,
    inv_freq: jax.Array,
    phasors: jax.Array,
    position: jax.Array,
    *,
    attention_scaling: float = 1.0,
    trigonometric: bool = True,
    norm_weighting: bool = True,
) -> jax.Array:
    """Raw scores S̃ of every key for every query head, float32 (layers, batch, heads, slots);
    arguments as `key_score_terms`. `trigonometric=False` drops the series (ablation)."""
    trig, norm = key_score_terms(
        keys, stats, inv_freq, phasors, position, attention_scaling=attention_scaling, norm_weighting=norm_weighting
    )
    return trig + norm if trigonometric else norm


def normalized_scores(raw: jax.Array, valid: jax.Array, num_kv_heads: int) -> jax.Array:
    """z-score per query head over the valid keys, then max over each GQA group.

    raw: (layers, batch, heads, slots); valid: (layers, batch, kv_heads, slots).
    Returns (layers, batch, kv_heads, slots), −inf on invalid slots.
    """
    L, B, H, S = raw.shape
    raw = raw.reshape(L, B, num_kv_heads, H // num_kv_heads, S)
    mask = valid[:, :, :, None, :]
    count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(mask, raw, 0.0), axis=-1, keepdims=True) / count
    var = jnp.sum(jnp.where(mask, (raw - mean) ** 2, 0.0), axis=-1, keepdims=True) / count
    z = (raw - mean) / jnp.maximum(jnp.sqrt(var), STD_FLOOR)
    return jnp.where(valid, jnp.max(z, axis=3), -jnp.inf)


def aggregate(scores: jax.Array, valid: jax.Array, mode: str) -> jax.Array:
    """One selection score per slot, broadcast back to (layers, batch, kv_heads, slots).

    per_head: mean over layers (each KV-head index keeps the same tokens in every layer);
    per_layer_per_head: unchanged; per_layer: max over KV heads (one token set per layer).
    """
    if mode == "per_layer_per_head":
        return scores
    finite = jnp.where(valid, scores, 0.0)
    if mode == "per_head":
        combined = jnp.sum(finite, axis=0, keepdims=True) / jnp.maximum(jnp.sum(valid, axis=0, keepdims=True), 1)
        combined = jnp.where(jnp.any(valid, axis=0, keepdims=True), combined, -jnp.inf)
    elif mode == "per_layer":
        combined = jnp.max(scores, axis=2, keepdims=True)
    else:
        raise ValueError(f"unknown aggregation {mode!r}: choose one of {AGGREGATIONS}")
    return jnp.broadcast_to(combined, scores.shape)
