"""Fitting the scorer of `policies.triattention_fit` on calibration traces.

Each fitting sequence runs once through the model with full attention. At snapshots t0 (every
`snapshot_every` tokens), every key before t0 gets its features as the scorer would compute
them at t0, and a target: the attention the next `horizon` queries pay it (with horizon None
every later query of the sequence: an evicted key is gone for good), summed over the GQA
group, optionally times ‖v‖ (the key's share of the attention output), normalised over the
keys before t0 that are not sinks (the scorer keeps those whatever they score). The "kept"
target is the selection itself: uniform over the `budget` keys (less the sinks) with the most
attention from those queries (what an oracle would keep), so the fit weighs the
keys at the budget's boundary rather than the few that draw most of the attention; snapshots
with no more than `budget` keys before them select nothing and are left out.

Per layer, the weights minimise the cross-entropy between that target and the scorer's
predicted distribution (`group_log_output`), with optax, starting by default from Expected
Attention's score from the same statistics (`prior_weights`): started from the paper's score,
the optimiser ends at a higher cross-entropy than that prior has (SmolLM2: 5.89 against 5.65
per layer, output target) and evicts worse. Features are standardised per head for the
optimiser and the weights mapped back to raw units (a constant shift of a head's scores does
not change its softmax, so the standardisation's offset drops; log ‖v‖, outside the softmax,
is scaled only).

That cross-entropy is still not what eviction needs (with the attention target, the prior
evicted better than the fitted weights on every model), and how a model's layers should share
token sets differs between models. So `choose_scorer` then decodes documents the weights
were not fitted on (and no evaluation reads), teacher-forced at a budget, with blends
(1 - a) * prior + a * fitted of the fitted weights and that prior (`prior_weights`), under
each aggregation and mix with R-KV's redundancy, and keeps the setting with the lowest mean KL
to full attention.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from triattention_jax.checkpoints.stats import FitResult, model_metadata
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH
from triattention_jax.errors import UserError
from triattention_jax.eval.fidelity import PREFILL_TOKENS, FullAttentionReference
from triattention_jax.methods import PolicySettings, build_policy
from triattention_jax.model import Transformer
from triattention_jax.policies.base import sink_keys
from triattention_jax.policies.triattention_fit import (
    FEATURES,
    SINK_POSITIONS,
    VALUE_FEATURE,
    group_log_output,
    key_features,
)
from triattention_jax.prompts import token_fingerprint
from triattention_jax.scoring import DEFAULT_OFFSETS, FrequencyStats, offset_phasors

TARGETS = ("attention", "output", "kept")
# Where the optimiser starts: the paper's score (trigonometric + norm, weight 1 each) or
# Expected Attention's (`prior_weights`), the scorer the choice blends towards.
STARTS = ("paper", "prior")
# The fitted weights' share in the chosen scorer, and the token-set sharings tried: one set per
# KV-head index for all layers (best on SmolLM2) or one per (layer, KV head) (best on Qwen2.5).
BLENDS = (0.0, 0.5, 1.0)
SELECTION_AGGREGATIONS = ("per_head", "per_layer_per_head")
# The mixes with R-KV's redundancy among the cached keys tried (`TriAttentionFit`): 0.7 lowers
# the KL on the Qwen2.5-Coder models, on SmolLM2 no mix does beyond noise (WORKSPACE, session 24).
REDUNDANCY_WEIGHTS = (0.0, 0.5, 0.7, 0.9)


TRACE_LENGTH_STEP = 512


def _trace_width(length: int) -> int:
    """Traces are padded to a multiple of TRACE_LENGTH_STEP tokens, so they compile once per
    step rather than once per length (on a GPU a compile costs more than a sequence's work;
    a coarser step, such as powers of two, would waste more compute on a CPU)."""
    return -(-length // TRACE_LENGTH_STEP) * TRACE_LENGTH_STEP


def snapshot_positions(length: int, horizon: int | None, snapshot_every: int, after: int = 0) -> tuple[int, ...]:
    """The t0 at which a sequence of `length` tokens is scored: every `snapshot_every` tokens
    from `snapshot_every` on, past `after`, each with `horizon` tokens after it (None: at least
    `snapshot_every`, the target then covering every query to the end of the sequence)."""
    last = length - (horizon or snapshot_every)
    return tuple(t0 for t0 in range(snapshot_every, last + 1, snapshot_every) if t0 > after)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def trace_sequence(graphdef, state, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One sequence (1, T) with full attention: per layer post-RoPE queries (layers, T, heads,
    head_dim), keys and values (layers, kv_heads, T, head_dim)."""
    transformer = nnx.merge(graphdef, state)
    positions = jnp.arange(tokens.shape[1])[None]
    out = transformer.extend(None, tokens, positions, logits_at=jnp.zeros((1,), jnp.int32), collect_rope_queries=True)
    return out.rope_queries[:, 0], jnp.stack(out.k)[:, 0], jnp.stack(out.v)[:, 0]


@functools.partial(
    jax.jit, static_argnames=("snapshots", "horizon", "target", "budget", "attention_scale", "attention_scaling")
)
def _layer_examples(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    length: jax.Array,
    stats: FrequencyStats,
    q_band_var: jax.Array,
    inv_freq: jax.Array,
    phasors: jax.Array,
    *,
    snapshots: tuple[int, ...],
    horizon: int | None,
    target: str,
    budget: int,
    attention_scale: float,
    attention_scaling: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer of one sequence: features (snapshots, heads, T, features), the target
    distribution (snapshots, kv_heads, T) and the mask of the keys scored at t0 (snapshots, T):
    before t0, not sinks (the scorer keeps those whatever they score).

    queries: (T, heads, head_dim) post-RoPE; keys, values: (kv_heads, T, head_dim); length:
    () the sequence's own length, the rest of T padding whose queries pay nothing."""
    T, H, hd = queries.shape
    K = keys.shape[0]
    key_pos = jnp.broadcast_to(jnp.arange(T)[None, None], (1, K, T))
    value_norm = jnp.linalg.norm(values.astype(jnp.float32), axis=-1)  # (K, T)
    # A query's attention weights do not depend on t0, so one causal attention pass serves every
    # snapshot: mass_after[t, s] sums what queries t, t+1, ... pay key s (over the GQA group).
    grouped = queries.astype(jnp.float32).reshape(T, K, H // K, hd)
    logits = jnp.einsum("tkgd,ksd->kgts", grouped, keys.astype(jnp.float32)) * attention_scale
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    weights = jnp.sum(jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1), axis=1)  # (K, T, T)
    weights = jnp.where((jnp.arange(T) < length)[None, :, None], weights, 0.0)
    mass_after = jnp.cumsum(weights[:, ::-1], axis=1)[:, ::-1]
    mass_after = jnp.concatenate([mass_after, jnp.zeros_like(mass_after[:, :1])], axis=1)  # row T: nothing after
    features, targets, masks = [], [], []
    for t0 in snapshots:
        scored = (jnp.arange(T) < t0) & ~sink_keys(jnp.arange(T), SINK_POSITIONS)
        features.append(
            key_features(
                keys[None],
                values[None],
                key_pos,
                jnp.asarray([t0]),
                stats,
                q_band_var,
                inv_freq,
                phasors,
                attention_scaling,
            )[0]
        )
        mass = mass_after[:, t0] - mass_after[:, T if horizon is None else t0 + horizon]  # (K, T)
        if target == "output":
            mass = mass * value_norm
        mass = jnp.where(scored, mass, 0.0)
        if target == "kept":  # the sinks hold SINK_POSITIONS of the budget's slots
            threshold = jnp.sort(jnp.where(scored, mass, -1.0), axis=-1)[:, T - (budget - SINK_POSITIONS)]
            mass = (scored & (mass >= threshold[:, None])).astype(jnp.float32)
        targets.append(mass / jnp.sum(mass, axis=-1, keepdims=True))
        masks.append(scored)
    return jnp.stack(features), jnp.stack(targets), jnp.stack(masks)


def sequence_examples(
    transformer: Transformer,
    stats: FrequencyStats,
    q_band_var: np.ndarray,
    sequences: Sequence[Sequence[int]],
    *,
    horizon: int | None,
    snapshot_every: int,
    target: str,
    budget: int,
    after: int,
) -> Iterator[list[tuple[jax.Array, jax.Array, jax.Array]]]:
    """Per sequence, each layer's (features, targets, mask) of `_layer_examples`, the sequence
    traced once with full attention and padded to its `_trace_width`."""
    config = transformer.config
    inv_freq = np.asarray(transformer.inv_freq[...])
    phasors = jnp.asarray(offset_phasors(inv_freq, DEFAULT_OFFSETS))
    stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), stats)
    graphdef, state = nnx.split(transformer)
    for tokens in sequences:
        padded = np.zeros((1, _trace_width(len(tokens))), np.int32)
        padded[0, : len(tokens)] = tokens
        queries, keys, values = trace_sequence(graphdef, state, jnp.asarray(padded))
        yield [
            _layer_examples(
                queries[layer],
                keys[layer],
                values[layer],
                jnp.asarray(len(tokens), jnp.int32),
                jax.tree.map(lambda s, i=layer: s[i : i + 1], stats),
                jnp.asarray(q_band_var[layer]),
                jnp.asarray(inv_freq),
                phasors,
                snapshots=snapshot_positions(len(tokens), horizon, snapshot_every, after),
                horizon=horizon,
                target=target,
                budget=budget,
                attention_scale=config.head_dim**-0.5,
                attention_scaling=float(transformer.attention_scaling),
            )
            for layer in range(config.num_layers)
        ]


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate", "l2"))
def _fit_layer(
    x: jax.Array,
    y: jax.Array,
    mask: jax.Array,
    start: jax.Array,
    *,
    steps: int,
    learning_rate: float,
    l2: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weights (heads, features) in raw units, and the mean cross-entropy at the `start`
    weights (heads, features; raw units) and after fitting. Every layer's examples have the
    same shapes, so this compiles once for all of them.

    x: (N, heads, T, F) features; y: (N, kv_heads, T) targets; mask: (N, T)."""
    K = y.shape[1]
    valid = mask[:, None, :, None]
    count = jnp.maximum(jnp.sum(jnp.broadcast_to(valid, x.shape[:3] + (1,)), axis=(0, 2)), 1)  # (H, 1)
    # log ‖v‖ multiplies a head's share outside its softmax: a shift there would reweigh the
    # group's heads, so it is scaled only.
    mean = (jnp.sum(jnp.where(valid, x, 0.0), axis=(0, 2)) / count).at[:, VALUE_FEATURE].set(0.0)
    std = jnp.sqrt(jnp.sum(jnp.where(valid, (x - mean[None, :, None]) ** 2, 0.0), axis=(0, 2)) / count)
    std = jnp.where(std > 1e-6, std, 1.0)
    x = jnp.where(valid, (x - mean[None, :, None]) / std[None, :, None], 0.0)
    kv_mask = jnp.broadcast_to(mask[:, None, :], y.shape)

    def cross_entropy(w: jax.Array) -> jax.Array:
        log_q = group_log_output(x, w, kv_mask, K)
        return -jnp.sum(y * jnp.where(kv_mask, log_q, 0.0)) / (y.shape[0] * K)

    def loss(w: jax.Array) -> jax.Array:
        return cross_entropy(w) + l2 * jnp.sum(w**2)

    start = start * std
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        w, opt_state = carry
        grads = jax.grad(loss)(w)
        updates, opt_state = optimizer.update(grads, opt_state, w)
        return (optax.apply_updates(w, updates), opt_state), None

    (fitted, _), _ = jax.lax.scan(step, (start, optimizer.init(start)), length=steps)
    return fitted / std, cross_entropy(start), cross_entropy(fitted)


def fit_scorer(
    transformer: Transformer,
    stats: FrequencyStats,
    q_band_var: np.ndarray,
    sequences: Sequence[Sequence[int]],
    *,
    target: str = "output",
    start: str = "prior",
    horizon: int | None = 512,
    budget: int = 512,
    snapshot_every: int = 256,
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-4,
    documents: Sequence[str] = (),
    progress: bool = True,
) -> FitResult:
    """Fits `triattention_fit`'s weights on `sequences` (token id lists; those too short for one
    snapshot are skipped: see `snapshot_positions`) with the model's TriAttention `stats` and
    the query variance per band `q_band_var` (layers, heads, head_dim/2) of the same
    calibration (`QueryMoments.band_variance`). start: one of STARTS. horizon None: every later query of a sequence;
    budget: the kept set's size for the "kept" target, whose snapshots start past it.
    documents: names of the texts the sequences come from, recorded with the sequences'
    fingerprints so evaluations can prove they are disjoint."""
    if target not in TARGETS:
        raise UserError(f"unknown fit target {target!r}: choose one of {', '.join(TARGETS)}")
    if start not in STARTS:
        raise UserError(f"unknown fit start {start!r}: choose one of {', '.join(STARTS)}")
    after = budget if target == "kept" else 0
    sequences = [list(s) for s in sequences if len(snapshot_positions(len(s), horizon, snapshot_every, after))]
    if not sequences:
        first = (after // snapshot_every + 1) * snapshot_every
        raise UserError(
            f"no fitting sequence is long enough: each needs at least {first + (horizon or snapshot_every)} tokens "
            "(give longer texts, or a larger --fit_seq_len)"
        )
    from tqdm import tqdm

    config = transformer.config
    q_band_var = np.asarray(q_band_var, np.float32)
    per_layer: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(config.num_layers)]
    width = max(_trace_width(len(s)) for s in sequences)
    traced = sequence_examples(
        transformer,
        stats,
        q_band_var,
        sequences,
        horizon=horizon,
        snapshot_every=snapshot_every,
        target=target,
        budget=budget,
        after=after,
    )
    for layers in tqdm(
        traced, total=len(sequences), desc="fitting traces", unit="seq", disable=not progress, file=sys.stderr
    ):
        for layer, (x, y, mask) in enumerate(layers):
            pad = width - mask.shape[-1]  # sequences of different buckets share one array per layer
            per_layer[layer].append(
                (
                    np.pad(np.asarray(x), ((0, 0), (0, 0), (0, pad), (0, 0))),
                    np.pad(np.asarray(y), ((0, 0), (0, 0), (0, pad))),
                    np.pad(np.asarray(mask), ((0, 0), (0, pad))),
                )
            )
    if start == "prior":
        starts = prior_weights(
            config.num_layers, config.num_heads, config.head_dim, float(transformer.attention_scaling)
        )
    else:
        starts = np.zeros((config.num_layers, config.num_heads, len(FEATURES)), np.float32)
        starts[..., [FEATURES.index("trigonometric"), FEATURES.index("norm")]] = 1.0
    weights, before, after = [], [], []
    for examples, layer_start in tqdm(
        zip(per_layer, starts),
        total=len(per_layer),
        desc="fitting layers",
        unit="layer",
        disable=not progress,
        file=sys.stderr,
    ):
        w, loss_before, loss_after = _fit_layer(
            *(jnp.asarray(np.concatenate(parts)) for parts in zip(*examples)),
            jnp.asarray(layer_start),
            steps=steps,
            learning_rate=learning_rate,
            l2=l2,
        )
        weights.append(np.asarray(w, np.float32))
        before.append(float(loss_before))
        after.append(float(loss_after))
    metadata = {
        **model_metadata(transformer),
        "features": list(FEATURES),
        "target": target,
        "start": start,
        "horizon": horizon,
        **({"budget": budget} if target == "kept" else {}),
        "snapshot_every": snapshot_every,
        "steps": steps,
        "learning_rate": learning_rate,
        "l2": l2,
        "num_sequences": len(sequences),
        "num_tokens": sum(len(s) for s in sequences),
        "documents": list(documents),
        "fingerprints": [token_fingerprint(s) for s in sequences],
        "cross_entropy_start": before,
        "cross_entropy_fitted": after,
    }
    return FitResult(weights=np.stack(weights), q_band_var=q_band_var, metadata=metadata)


def prior_weights(num_layers: int, num_heads: int, head_dim: int, attention_scaling: float = 1.0) -> np.ndarray:
    """Expected Attention's score from calibration statistics (`expected_attention_calibrated`
    over the same offsets) as weights of FEATURES (layers, heads, features): mu.k / sqrt(d) (the
    trigonometric feature: the query mean rotated by RoPE averaged over the future offsets, which
    carries the magnitude factor once more than Expected Attention's rotated mean does) +
    k^T Sigma k / (2d) (Sigma isotropic within a band: sigma_f^2 / 2 per component, half the
    second_moment feature) + log ||v|| (it weighs a key by its value norm)."""
    weights = np.zeros((num_layers, num_heads, len(FEATURES)), np.float32)
    for feature, weight in {
        "trigonometric": head_dim**-0.5 / attention_scaling,
        "second_moment": 0.5,
        "log_value_norm": 1.0,
    }.items():
        weights[..., FEATURES.index(feature)] = weight
    return weights


def _candidate_name(blend: float, aggregation: str, redundancy_weight: float) -> str:
    return f"blend={blend:g};aggregation={aggregation};redundancy_weight={redundancy_weight:g}"


def choose_scorer(
    transformer: Transformer,
    stats: FrequencyStats,
    fitted: FitResult,
    documents: Sequence[tuple[str, Sequence[int]]],
    *,
    budget: int,
    blends: Sequence[float] = BLENDS,
    aggregations: Sequence[str] = SELECTION_AGGREGATIONS,
    redundancy_weights: Sequence[float] = REDUNDANCY_WEIGHTS,
    batch_size: int = 2,
    progress: bool = True,
) -> FitResult:
    """`fitted` with the weights (1 - a) * prior + a * fitted (`prior_weights`), the aggregation
    and the redundancy weight (`TriAttentionFit.redundancy_weight`) whose teacher-forced decoding
    of `documents` ((name, token ids), cut to the shortest; texts `fitted` was not fitted on, else
    the choice favours the fit) at `budget` has the lowest mean KL to full attention: a in
    `blends` under each of `aggregations` without the mix, then the best of those with each
    nonzero weight of `redundancy_weights`. Every candidate's KL per document and the
    documents' names and fingerprints go into the metadata; a fit chosen before keeps that
    choice's record under "earlier_selections".
    batch_size: documents decoded at once (each holds its full-attention log-probs on the device)."""
    if not documents:
        raise UserError("no documents to choose the fitted scorer on: give some (--fit_code_files), or skip the choice")
    overlap = sorted(set(fitted.metadata.get("fingerprints", ())) & {token_fingerprint(t) for _, t in documents})
    if overlap:
        raise UserError(f"the fitted scorer was fitted on {len(overlap)} of the documents to choose it on: give others")
    length = min((len(tokens) for _, tokens in documents), default=0)
    if length < selection_length(budget):
        raise UserError(
            f"choosing the fitted scorer at budget {budget} needs fitting documents of at least "
            f"{selection_length(budget)} tokens, the shortest has {length}: raise --fit_seq_len or lower --fit_budget"
        )
    from tqdm import tqdm

    config = transformer.config
    tokens = np.asarray([list(t)[:length] for _, t in documents], np.int32)
    prior = prior_weights(config.num_layers, config.num_heads, config.head_dim, float(transformer.attention_scaling))

    def blended(blend: float) -> np.ndarray:
        return (1.0 - blend) * prior + blend * np.asarray(fitted.weights, np.float32)

    def policy(blend: float, aggregation: str, redundancy_weight: float):
        settings = PolicySettings(
            budget=budget, protect_prompt=False, aggregation=aggregation, redundancy_weight=redundancy_weight
        )
        fit = dataclasses.replace(fitted, weights=blended(blend))
        return build_policy(transformer, "triattention_fit", settings, stats=stats, fit=fit)

    kl: dict[tuple[float, str, float], list[float]] = {}

    def decode(batch: list[tuple[float, str, float]]) -> tuple[float, str, float]:
        """Each candidate's KL per document; returns the candidate with the lowest mean so far."""
        for first in range(0, len(tokens), batch_size):
            reference = FullAttentionReference.of(transformer, tokens[first : first + batch_size])
            for candidate in batch:
                kl.setdefault(candidate, []).extend(cell["kl"] for cell in reference.fidelity(policy(*candidate)))
                bar.update(len(reference.tokens))
            del reference  # its log-probs fill the device before the next batch's
        return min(kl, key=lambda candidate: np.mean(kl[candidate]))

    unmixed = [(blend, aggregation, 0.0) for blend, aggregation in itertools.product(blends, aggregations)]
    mixes = [weight for weight in redundancy_weights if weight]
    runs = len(tokens) * (len(unmixed) + len(mixes))
    with tqdm(total=runs, desc="choosing", unit="run", disable=not progress, file=sys.stderr) as bar:
        blend, aggregation, redundancy_weight = decode(unmixed)
        # The mix is tried with the best blend and aggregation only: the whole grid would decode
        # four times as many candidates (the references are decoded once more instead).
        if mixes:
            blend, aggregation, redundancy_weight = decode([(blend, aggregation, weight) for weight in mixes])
    earlier = [*fitted.metadata.get("earlier_selections", []), *filter(None, [fitted.metadata.get("selection")])]
    mean_kl = {_candidate_name(*candidate): float(np.mean(values)) for candidate, values in kl.items()}
    metadata = {
        **fitted.metadata,
        "aggregation": aggregation,
        "blend": blend,
        "redundancy_weight": redundancy_weight,
        "selection": {
            "budget": budget,
            "seq_len": length,
            "documents": [name for name, _ in documents],
            "fingerprints": [token_fingerprint(row) for row in tokens],
            "mean_kl": mean_kl,
            "kl": {_candidate_name(*candidate): values for candidate, values in kl.items()},
        },
        **({"earlier_selections": earlier} if earlier else {}),
    }
    return FitResult(weights=blended(blend), q_band_var=fitted.q_band_var, metadata=metadata)


def selection_length(budget: int) -> int:
    """The fewest tokens a document needs for `choose_scorer` at `budget`: the prefill, the
    rounds that fill the budget, and one round decoded after an eviction."""
    return PREFILL_TOKENS + budget + DEFAULT_DIVIDE_LENGTH
