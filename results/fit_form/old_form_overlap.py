"""Why the fit's prior did not render calibrated Expected Attention (session 21): the share of
the 512 tokens each (layer, KV head) keeps that the fit's old form, with the prior's weights,
keeps in common with `expected_attention_calibrated:max_offset=65536;aggregation=per_layer_per_head`,
with the old form's three differences undone one at a time and together. Runs against commit
7475d40 (the form before; FEATURES then had a sink feature and an unshrunk second moment):

    git worktree add /tmp/old 7475d40
    PYTHONPATH=/tmp/old TRIATTENTION_MODELS=/tmp/store python results/fit_form/old_form_overlap.py MODEL TOKENS

One compaction at t0 = TOKENS on the first two documents the choice uses, prefilled with full attention.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from triattention_jax.cache import KVCache
from triattention_jax.calibration import stats_for_model
from triattention_jax.checkpoints.store import load_model
from triattention_jax.eval.runner import build_eval_policy
from triattention_jax.eval.texts import fit_documents
from triattention_jax.fitting import prior_weights, trace_sequence
from triattention_jax.policies.base import RoundContext
from triattention_jax.policies.expected_attention import future_rotation
from triattention_jax.policies.triattention_fit import FEATURES, key_features
from triattention_jax.rope import band_power
from triattention_jax.scoring import DEFAULT_OFFSETS, offset_phasors

BUDGET, SINKS = 512, 4
VARIANTS = {  # name: (shrink the second moment, log ||v|| outside the softmax, sinks outside the softmax)
    "old form": (False, False, False),
    "second moment shrunk": (True, False, False),
    "||v|| outside": (False, True, False),
    "sinks outside": (False, False, True),
    "all three": (True, True, True),
}


def logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis, keepdims=True)
    return np.log(np.mean(np.exp(x - top), axis=axis)) + np.squeeze(top, axis)


def main(model: str, tokens: str) -> None:
    T = int(tokens)
    loaded = load_model(model, dtype="float32")
    transformer, config = loaded.transformer, loaded.transformer.config
    calibration = stats_for_model(loaded)
    L, H, K, hd = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
    reference = build_eval_policy(
        loaded, "expected_attention_calibrated:max_offset=65536;aggregation=per_layer_per_head", BUDGET
    )
    inv_freq = jnp.asarray(np.asarray(transformer.inv_freq[...]), jnp.float32)
    scaling = float(transformer.attention_scaling)
    phasors = jnp.asarray(offset_phasors(np.asarray(transformer.inv_freq[...]), DEFAULT_OFFSETS))
    weights = prior_weights(L, H, hd)
    value, second, sink = (FEATURES.index(f) for f in ("log_value_norm", "second_moment", "sink"))
    graphdef, state = nnx.split(transformer)
    for name, document in fit_documents(loaded.tokenizer, 4, 4096, skip=4)[:2]:
        _, keys, values = trace_sequence(graphdef, state, jnp.asarray(document[:T], jnp.int32)[None])
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (L, 1, K, T))
        cache = KVCache.from_stacked(k=keys[:, None], v=values[:, None], pos=positions, cursor=jnp.asarray(T))
        context = RoundContext(prompt_lengths=jnp.zeros(1, jnp.int32), position=jnp.asarray([T], jnp.int32))
        want = np.asarray(reference.scores(cache, context))[:, 0]  # (L, K, T)
        cos, sin = future_rotation(context.position, inv_freq, scaling, DEFAULT_OFFSETS)
        surviving = np.asarray(cos**2 + sin**2)[0]
        shared = {v: [] for v in VARIANTS}
        for layer in range(L):
            stats = jax.tree.map(lambda a, i=layer: jnp.asarray(a[i : i + 1], jnp.float32), calibration.stats)
            band_var = np.asarray(calibration.q_band_var[layer])
            features = np.asarray(
                key_features(
                    keys[layer][None],
                    values[layer][None],
                    positions[layer],
                    context.position,
                    stats,
                    jnp.asarray(band_var),
                    inv_freq,
                    phasors,
                    scaling,
                )
            )[0]  # (H, T, F)
            shrunk = np.einsum(
                "kgf,ksf->kgs", (band_var * surviving).reshape(K, H // K, -1), np.asarray(band_power(keys[layer]))
            )
            log_v = np.log(np.linalg.norm(np.asarray(values[layer]), axis=-1) + 1e-6)  # (K, T)
            for variant, (shrink, v_outside, sinks_outside) in VARIANTS.items():
                x, w = features.copy(), weights[layer].copy()
                if shrink:
                    x[..., second] = shrunk.reshape(H, T) / (2 * hd)
                if v_outside:
                    w[:, value] = 0
                if sinks_outside:
                    w[:, sink] = 0
                logits = np.einsum("hsf,hf->hs", x, w).reshape(K, H // K, T)
                if sinks_outside:
                    logits[..., :SINKS] = -np.inf
                top = logits.max(-1, keepdims=True)
                log_softmax = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
                score = logmeanexp(log_softmax, axis=1) + (log_v if v_outside else 0)
                if sinks_outside:
                    score[:, :SINKS] = np.inf
                for kv in range(K):
                    kept = set(np.argsort(-score[kv])[:BUDGET]) & set(np.argsort(-want[layer, kv])[:BUDGET])
                    shared[variant].append(len(kept) / BUDGET)
        print(name, {v: f"{np.mean(s):.3f} (least {np.min(s):.3f})" for v, s in shared.items()}, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
