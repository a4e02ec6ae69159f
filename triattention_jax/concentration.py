"""How concentrated each head's pre-RoPE queries are, and how well the trigonometric series
built from the query and key centres reconstructs real attention logits against distance."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from triattention_jax.calibration import QueryMoments
from triattention_jax.files import pyplot
from triattention_jax.model import Transformer
from triattention_jax.rope import apply_rope, rope_cos_sin


def log_spaced_distances(max_distance: int, count: int = 48) -> np.ndarray:
    return np.unique(np.geomspace(1, max_distance, count).astype(int))


def attention_inputs(transformer: Transformer, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Post-RoPE queries (layers, T, heads, head_dim) and keys (layers, kv_heads, T, head_dim)
    of one sequence, float64."""
    tokens = jnp.asarray([list(tokens)], jnp.int32)
    positions = jnp.arange(tokens.shape[1])[None]
    out = transformer.extend(None, tokens, positions, logits_at=jnp.zeros(1, jnp.int32), collect_pre_rope=True)
    cos, sin = rope_cos_sin(positions, transformer.inv_freq[...], transformer.attention_scaling)
    queries = np.asarray(apply_rope(out.queries[:, 0], cos[0, :, None], sin[0, :, None]), np.float64)
    return queries, np.asarray(jnp.stack(out.k)[:, 0], np.float64)


def measured_logits_by_distance(queries: np.ndarray, keys: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Mean attention logit q_t·k_{t−Δ} per (layer, head, Δ), from `attention_inputs`."""
    layers, _, heads, _ = queries.shape
    group = heads // keys.shape[1]
    result = np.zeros((layers, heads, len(distances)))
    for layer in range(layers):
        for head in range(heads):
            logits = queries[layer, :, head] @ keys[layer, head // group].T  # (T query, T key)
            result[layer, head] = [np.diagonal(logits, offset=-int(d)).mean() for d in distances]
    return result


def key_norm_attention(queries: np.ndarray, keys: np.ndarray, scale: float, num_queries: int) -> dict[str, Any]:
    """How the attention a key receives relates to its norm, per (layer, KV head).

    Attention received: the mean softmax weight from the GQA group's last `num_queries` queries,
    over the keys before all of them. Returns the Spearman correlation of |k| with it, and the
    share of those keys whose norm exceeds the first token's (the attention sink). A score
    that rises with |k| alone keeps what attention ignores where the correlation is negative.
    """
    layers, length, heads, _ = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    older = length - num_queries
    visible = np.arange(length)[None] <= np.arange(older, length)[:, None]
    rho = np.zeros((layers, kv_heads))
    above_sink = np.zeros((layers, kv_heads))
    for layer in range(layers):
        for kv in range(kv_heads):
            logits = (
                np.einsum("thd,sd->hts", queries[layer, older:, kv * group : (kv + 1) * group], keys[layer, kv]) * scale
            )
            logits = np.where(visible, logits, -np.inf)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            received = (weights / weights.sum(-1, keepdims=True)).mean((0, 1))[:older]
            norms = np.linalg.norm(keys[layer, kv, :older], axis=-1)
            rho[layer, kv] = pearson(_ranks(norms), _ranks(received))
            above_sink[layer, kv] = (norms > norms[0]).mean()
    return {
        "queries": num_queries,
        "spearman_per_kv_head": rho.round(4).tolist(),
        "spearman_median": float(np.median(rho)),
        "fraction_negative": float((rho < 0).mean()),
        "share_of_keys_larger_than_sink_median": float(np.median(above_sink)),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def predicted_logits_by_distance(
    moments: QueryMoments, inv_freq: np.ndarray, group: int, distances: np.ndarray
) -> np.ndarray:
    """Σ_f |qm_f||km_f| cos(ω_f Δ + arg qm_f − arg km_f) per (layer, head, Δ)."""
    q_mean = moments.q_sum / moments.count
    k_mean = np.repeat(moments.key_means(), group, axis=1)
    phase = np.exp(1j * np.asarray(inv_freq, np.float64)[None, :] * distances[:, None])  # (D, F)
    return np.einsum("lhf,df->lhd", q_mean * np.conj(k_mean), phase).real


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation along the last axis."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.maximum(np.sqrt((a * a).sum(-1) * (b * b).sum(-1)), 1e-30)


def concentration_report(transformer: Transformer, moments: QueryMoments, sequence: Sequence[int]) -> dict[str, Any]:
    """Numbers of the report: R per head, R_f distribution, reconstruction correlations, and
    how key norms relate to the attention keys receive."""
    config = transformer.config
    r_head, r_band = moments.resultant_lengths()
    # Up to half the sequence, so every distance averages at least T/2 query-key pairs and
    # no single pair (such as the attention sink at position 0) dominates a point.
    distances = log_spaced_distances(len(sequence) // 2)
    queries, keys = attention_inputs(transformer, sequence)
    measured = measured_logits_by_distance(queries, keys, distances)
    predicted = predicted_logits_by_distance(
        moments, np.asarray(transformer.inv_freq[...]), config.num_heads // config.num_kv_heads, distances
    )
    correlation = pearson(predicted, measured)
    return {
        "num_tokens": moments.count,
        "heads": int(r_head.size),
        "R_per_head": r_head.round(4).tolist(),
        "fraction_R_above_0.95": float((r_head > 0.95).mean()),
        "fraction_R_above_0.90": float((r_head > 0.90).mean()),
        "R_median": float(np.median(r_head)),
        "R_f_quantiles": {str(q): float(np.quantile(r_band, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
        "R_f_mean_per_band": r_band.mean((0, 1)).round(4).tolist(),
        "reconstruction": {
            "sequence_tokens": len(sequence),
            "distances": distances.tolist(),
            "pearson_per_head": correlation.round(4).tolist(),
            "pearson_mean": float(correlation.mean()),
            "pearson_median": float(np.median(correlation)),
            "fraction_pearson_above_0.5": float((correlation > 0.5).mean()),
        },
        # The last quarter of the sequence attends over the first three quarters.
        "key_norm_vs_attention": key_norm_attention(queries, keys, transformer.attention_scale, len(sequence) // 4),
        "_curves": {"measured": measured, "predicted": predicted},
    }


def write_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """report.json, r_histogram.png and reconstruction.png (a few heads, predicted vs measured)."""
    plt = pyplot()

    folder.mkdir(parents=True, exist_ok=True)
    curves = report.pop("_curves")
    paths = [folder / "report.json", folder / "r_histogram.png", folder / "reconstruction.png"]
    tmp = paths[0].with_name(".report.json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(paths[0])

    r_head = np.asarray(report["R_per_head"]).ravel()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(r_head, bins=40, range=(0, 1))
    ax.set_xlabel("mean resultant length R of pre-RoPE queries")
    ax.set_ylabel("heads")
    ax.set_title(f"{report['fraction_R_above_0.95']:.1%} of heads have R > 0.95")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    correlation = np.asarray(report["reconstruction"]["pearson_per_head"])
    distances = np.asarray(report["reconstruction"]["distances"])
    order = np.argsort(correlation.ravel())
    picks = [order[-1], order[len(order) // 2], order[len(order) // 4], order[0]]
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.4))
    for ax, flat in zip(axes, picks):
        layer, head = np.unravel_index(flat, correlation.shape)
        measured, predicted = curves["measured"][layer, head], curves["predicted"][layer, head]
        ax.plot(distances, _standardized(measured), label="measured")
        ax.plot(distances, _standardized(predicted), label="predicted", linestyle="--")
        ax.set_xscale("log")
        ax.set_title(f"layer {layer} head {head}: r = {correlation[layer, head]:.2f}")
        ax.set_xlabel("distance")
    axes[0].set_ylabel("attention logit (standardized)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def _standardized(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit spread: the plots compare curve shapes, which is what Pearson measures."""
    return (x - x.mean()) / max(x.std(), 1e-12)
