"""The fitted TriAttention scorer: its features and group score against float64 NumPy, the fit
recovering known weights, statistics of the fit on disk, and decoding with it."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WIDE, random_transformer

from triattention_jax.bench.presets import random_stats
from triattention_jax.cache import KVCache, cache_nbytes
from triattention_jax.checkpoints.stats import FitResult, load_fit, model_metadata, save_fit
from triattention_jax.config import RopeConfig
from triattention_jax.decoding import generate
from triattention_jax.errors import UserError
from triattention_jax.eval.fidelity import FullAttentionReference
from triattention_jax.eval.runner import _check_disjoint_from_fit, fit_document_names
from triattention_jax.eval.store import ResultStore
from triattention_jax.eval.texts import FIT_FIRST_SOURCE, SOURCES, document_name, stdlib_sources
from triattention_jax.fitting import (
    BLENDS,
    REDUNDANCY_WEIGHTS,
    SELECTION_AGGREGATIONS,
    _fit_layer,
    _layer_examples,
    choose_scorer,
    fit_scorer,
    prior_weights,
    selection_length,
    snapshot_positions,
)
from triattention_jax.methods import PolicySettings, build_policy
from triattention_jax.pipeline import run_calibration
from triattention_jax.policies import RKV, ExpectedAttentionCalibrated, FullAttention, TriAttentionFit
from triattention_jax.policies.base import RoundContext
from triattention_jax.policies.triattention_fit import FEATURES, SINK_POSITIONS, group_log_output, key_features
from triattention_jax.prompts import token_fingerprint
from triattention_jax.rope import inverse_frequencies
from triattention_jax.scoring import DEFAULT_OFFSETS, FrequencyStats, key_score_terms, offset_phasors

B, K, G, HD, S = 2, 2, 3, 16, 30
H, F = K * G, HD // 2


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    inv_freq, _ = inverse_frequencies(RopeConfig(theta=10000.0), HD)
    keys = rng.normal(size=(B, K, S, HD))
    values = rng.normal(size=(B, K, S, HD)) * rng.uniform(0.2, 3.0, size=(B, K, S, 1))
    positions = np.broadcast_to(np.stack([rng.permutation(600)[:S] for _ in range(B)])[:, None], (B, K, S)).copy()
    positions[:, :, 0] = [[1], [2]]  # sinks
    positions[1, :, -4:] = -1  # empty slots
    qm = rng.normal(size=(1, H, F)) + 1j * rng.normal(size=(1, H, F))
    stats = FrequencyStats(
        q_mean_real=qm.real.astype(np.float32),
        q_mean_imag=qm.imag.astype(np.float32),
        q_abs_mean=(np.abs(qm) * 1.5).astype(np.float32),
    )
    return dict(
        keys=keys,
        values=values,
        positions=positions,
        t0=np.array([650, 700]),
        stats=stats,
        q_band_var=rng.uniform(0.1, 2.0, size=(H, F)),
        inv_freq=inv_freq,
    )


def test_features_match_numpy():
    p = _problem()
    phasors = offset_phasors(p["inv_freq"], DEFAULT_OFFSETS)
    got = np.asarray(
        key_features(
            jnp.asarray(p["keys"], jnp.float32),
            jnp.asarray(p["values"], jnp.float32),
            jnp.asarray(p["positions"]),
            jnp.asarray(p["t0"]),
            p["stats"],
            jnp.asarray(p["q_band_var"], jnp.float32),
            jnp.asarray(p["inv_freq"]),
            jnp.asarray(phasors),
        )
    )
    assert got.shape == (B, H, S, len(FEATURES))
    trig, norm = (
        np.asarray(t)[0]
        for t in key_score_terms(
            jnp.asarray(p["keys"][None], jnp.float32), p["stats"], p["inv_freq"], phasors, jnp.asarray(p["t0"])
        )
    )
    band_power = p["keys"][..., :F] ** 2 + p["keys"][..., F:] ** 2  # (B,K,S,F)
    angles = p["inv_freq"][None] * np.asarray(DEFAULT_OFFSETS, np.float64)[:, None]
    surviving = np.cos(angles).mean(0) ** 2 + np.sin(angles).mean(0) ** 2  # |mean rotation|² per band
    for h in range(H):
        kv = h // G
        want = np.stack(
            [
                trig[:, h],
                norm[:, h],
                (band_power[:, kv] * p["q_band_var"][h] * surviving).sum(-1) / (2 * HD),
                np.log(np.linalg.norm(p["values"][:, kv], axis=-1) + 1e-6),
                np.log1p(np.maximum(p["t0"][:, None] - p["positions"][:, kv], 0)),
            ],
            axis=-1,
        )
        np.testing.assert_allclose(got[:, h], want, rtol=2e-4, atol=2e-5)


def test_group_log_output_is_the_log_of_the_groups_output_share():
    """Per KV head: Σ_g softmax over the scored keys of w_g·x (log ‖v‖ left out) times
    ‖v‖^w_g,value, normalised over the scored keys."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(B, H, S, len(FEATURES)))
    weights = rng.normal(size=(H, len(FEATURES))) * 2
    scored = rng.uniform(size=(B, K, S)) > 0.2
    got = np.asarray(group_log_output(jnp.asarray(features), jnp.asarray(weights), jnp.asarray(scored), K))
    value = FEATURES.index("log_value_norm")
    inside = weights.copy()
    inside[:, value] = 0
    for b in range(B):
        for kv in range(K):
            mask = scored[b, kv]
            share = 0.0
            for h in range(kv * G, (kv + 1) * G):
                logits = features[b, h][mask] @ inside[h]
                attention = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                share = share + attention * np.exp(features[b, h][mask, value] * weights[h, value])
            np.testing.assert_allclose(got[b, kv][mask], np.log(share / share.sum()), rtol=1e-5, atol=1e-5)


def test_the_prior_is_expected_attention_with_calibrated_statistics():
    """prior_weights in the fit's form rank every key as expected_attention_calibrated over the
    same offsets does (up to a constant per (layer, row, KV head)), sinks and empty slots alike,
    under YaRN's magnitude factor."""
    transformer = random_transformer(
        {
            **WIDE,
            "rope_parameters": dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64
            ),
        }
    )
    c = transformer.config
    assert float(transformer.attention_scaling) > 1.1
    rng = np.random.default_rng(7)
    stats = random_stats(transformer, seed=2)
    q_band_var = rng.uniform(0.1, 3.0, size=(c.num_layers, c.num_heads, c.head_dim // 2))
    slots, L = 40, c.num_layers
    positions = np.stack([np.sort(4 + rng.permutation(296)[:slots]) for _ in range(2)])  # two rows
    positions[1, :3] = [0, 2, 7]  # two sinks in row 1
    positions = np.broadcast_to(positions[None, :, None], (L, 2, c.num_kv_heads, slots)).copy()
    positions[:, 1, :, -5:] = -1  # empty slots
    shape = (L, 2, c.num_kv_heads, slots, c.head_dim)
    cache = KVCache.from_stacked(
        k=jnp.asarray(rng.normal(size=shape) * 2, jnp.float32),
        v=jnp.asarray(rng.normal(size=shape) * rng.uniform(0.2, 3.0, size=shape[:-1] + (1,)), jnp.float32),
        pos=jnp.asarray(positions, jnp.int32),
        cursor=jnp.asarray(slots, jnp.int32),
    )
    context = RoundContext(prompt_lengths=jnp.zeros(2, jnp.int32), position=jnp.asarray([310, 320], jnp.int32))
    options = dict(budget=16, aggregation="per_layer_per_head")
    prior = prior_weights(L, c.num_heads, c.head_dim, float(transformer.attention_scaling))
    fit = np.asarray(TriAttentionFit.create(transformer, stats, q_band_var, prior, **options).scores(cache, context))
    expected = ExpectedAttentionCalibrated.create(transformer, stats, q_band_var, offsets=DEFAULT_OFFSETS, **options)
    want = np.asarray(expected.scores(cache, context))
    np.testing.assert_array_equal(np.isposinf(fit), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(fit), np.isneginf(want))
    assert np.isposinf(fit).sum() == 2 * L * c.num_kv_heads
    finite = np.isfinite(want)
    difference = np.where(finite, fit - want, np.nan)
    spread = np.nanmax(difference, axis=-1) - np.nanmin(difference, axis=-1)
    assert np.nanmax(spread) < 1e-4


def test_fit_recovers_the_weights_that_made_the_targets():
    """Targets drawn from the scorer's own model with known weights: the fit finds them."""
    rng = np.random.default_rng(2)
    n, t = 40, 64
    features = rng.normal(size=(n, H, t, len(FEATURES))) * rng.uniform(0.5, 4.0, size=len(FEATURES))
    truth = rng.normal(size=(H, len(FEATURES))) / features.std(axis=(0, 2))
    masks = np.arange(t)[None] < rng.integers(t // 2, t + 1, size=(n, 1))
    kv_masks = np.broadcast_to(masks[:, None], (n, K, t))
    log_q = np.asarray(group_log_output(features, truth, jnp.asarray(kv_masks), K))
    targets = np.where(kv_masks, np.exp(log_q), 0.0)
    start = np.zeros((H, len(FEATURES)), np.float32)
    weights, before, after = _fit_layer(features, targets, masks, start, steps=1500, learning_rate=0.05, l2=0.0)
    assert after < before
    np.testing.assert_allclose(weights, truth, rtol=0.1, atol=0.05 * np.abs(truth).max())


@pytest.mark.parametrize(
    "horizon, padding, target",
    [(24, 0, "attention"), (24, 48, "attention"), (None, 0, "attention"), (None, 48, "kept")],
)
def test_targets_match_numpy(horizon, padding, target):
    """The target at each snapshot t0: the attention queries t0 .. t0 + horizon - 1 (every
    later query with horizon None) pay each key before t0 but the sinks, summed over the group,
    normalised (kept: uniform over the BUDGET keys with the most, the sinks counted among them,
    at snapshots past BUDGET);
    a sequence padded past its length (garbage there) gives the same for its own snapshots."""
    problem, rng, T, budget = _problem(3), np.random.default_rng(6), 80, 20
    queries, keys = rng.normal(size=(T + padding, H, HD)), rng.normal(size=(K, T + padding, HD))
    snapshots = snapshot_positions(T, horizon, 16, budget if target == "kept" else 0)
    assert snapshots == {24: (16, 32, 48), None: (16, 32, 48, 64)}[horizon][target == "kept" :]
    _, targets, masks = _layer_examples(
        jnp.asarray(queries, jnp.float32),
        jnp.asarray(keys, jnp.float32),
        jnp.asarray(rng.normal(size=(K, T + padding, HD)), jnp.float32),
        jnp.asarray(T, jnp.int32),
        problem["stats"],
        jnp.asarray(problem["q_band_var"], jnp.float32),
        jnp.asarray(problem["inv_freq"]),
        jnp.asarray(offset_phasors(problem["inv_freq"], DEFAULT_OFFSETS)),
        snapshots=snapshots,
        horizon=horizon,
        target=target,
        budget=budget,
        attention_scale=HD**-0.5,
        attention_scaling=1.0,
    )
    queries, keys = queries[:T], keys[:, :T]
    logits = np.einsum("tkgd,ksd->kgts", queries.reshape(T, K, G, HD), keys) * HD**-0.5
    logits = np.where(np.tri(T, dtype=bool), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = (weights / weights.sum(-1, keepdims=True)).sum(1)  # (K, T queries, T keys)
    for i, t0 in enumerate(snapshots):
        mass = weights[:, t0 : T if horizon is None else t0 + horizon, SINK_POSITIONS:t0].sum(1)
        if target == "kept":
            top = np.argsort(-mass, axis=-1)[:, : budget - SINK_POSITIONS]
            mass = np.zeros_like(mass)
            np.put_along_axis(mass, top, 1.0, axis=-1)
        got = targets[i][:, SINK_POSITIONS:t0]
        np.testing.assert_allclose(got, mass / mass.sum(-1, keepdims=True), rtol=2e-4, atol=1e-7)
        assert not np.any(targets[i][:, t0:]) and not np.any(targets[i][:, :SINK_POSITIONS])
        assert np.array_equal(masks[i], (np.arange(T + padding) < t0) & (np.arange(T + padding) >= SINK_POSITIONS))


@pytest.mark.parametrize("target, needed", [("attention", 768), ("kept", 1280)])
def test_sequences_too_short_for_any_snapshot_are_refused(transformer, target, needed):
    """At least one snapshot needs snapshot_every (256) tokens before it, past the budget (512)
    for the kept target, and the horizon (512) after it."""
    stats = random_stats(transformer, seed=1)
    c = transformer.config
    with pytest.raises(UserError, match=f"at least {needed} tokens"):
        fit_scorer(
            transformer,
            stats,
            np.ones((c.num_layers, c.num_heads, c.head_dim // 2)),
            [[5] * (needed - 1)],
            target=target,
            progress=False,
        )


@pytest.fixture(scope="module")
def transformer():
    return random_transformer(WIDE)


@pytest.fixture(scope="module")
def fitted(transformer):
    rng = np.random.default_rng(4)
    sequences = [rng.integers(3, transformer.config.vocab_size, size=n).tolist() for n in (160, 128)]
    stats = random_stats(transformer, seed=1)
    c = transformer.config
    q_band_var = np.random.default_rng(5).uniform(0.1, 1.0, size=(c.num_layers, c.num_heads, c.head_dim // 2))
    return (
        fit_scorer(
            transformer,
            stats,
            q_band_var,
            sequences,
            horizon=32,
            snapshot_every=32,
            steps=100,
            documents=["a", "b"],
            progress=False,
        ),
        stats,
        sequences,
    )


def test_fit_scorer_improves_every_layer_and_records_its_texts(transformer, fitted):
    result, _, sequences = fitted
    c = transformer.config
    assert result.weights.shape == (c.num_layers, c.num_heads, len(FEATURES))
    assert result.q_band_var.shape == (c.num_layers, c.num_heads, c.head_dim // 2)
    assert np.isfinite(result.weights).all() and (result.q_band_var >= 0).all()
    assert all(a < b for a, b in zip(result.metadata["cross_entropy_fitted"], result.metadata["cross_entropy_start"]))
    assert result.metadata["fingerprints"] == [token_fingerprint(s) for s in sequences]
    assert result.metadata["features"] == list(FEATURES)


def test_a_fit_from_the_prior_starts_at_expected_attentions_weights(transformer, fitted):
    _, stats, sequences = fitted
    c = transformer.config
    result = fit_scorer(
        transformer,
        stats,
        np.ones((c.num_layers, c.num_heads, c.head_dim // 2), np.float32),
        sequences,
        start="prior",
        horizon=32,
        snapshot_every=32,
        steps=0,
        progress=False,
    )
    prior = prior_weights(c.num_layers, c.num_heads, c.head_dim, float(transformer.attention_scaling))
    np.testing.assert_allclose(result.weights, prior, rtol=1e-6)
    assert result.metadata["start"] == "prior"
    assert result.metadata["cross_entropy_fitted"] == result.metadata["cross_entropy_start"]


@pytest.mark.parametrize("option, value", [("fit_target", "loss"), ("fit_start", "zero")])
def test_calibration_refuses_an_unknown_fit_option_before_loading_the_model(option, value):
    settings = dict(calib_files=[], num_tokens=8, seq_len=8, batch_size=1, dtype="float32", out=None)
    with pytest.raises(UserError, match=f"unknown --{option} '{value}'"):
        run_calibration(model="no-such-model", report=False, report_dir=None, fit=True, **settings, **{option: value})


def test_fit_file_round_trip_and_checks(transformer, fitted, tmp_path):
    result, _, _ = fitted
    path = tmp_path / "fit.safetensors"
    save_fit(path, result)
    loaded = load_fit(path, transformer, FEATURES)
    np.testing.assert_array_equal(loaded.weights, result.weights)
    np.testing.assert_array_equal(loaded.q_band_var, result.q_band_var)
    with pytest.raises(UserError, match="features"):
        load_fit(path, transformer, FEATURES[:-1])
    other = random_transformer({**WIDE, "rope_theta": 500000.0})
    with pytest.raises(UserError, match="another model"):
        load_fit(path, other, FEATURES)
    with pytest.raises(UserError, match="does not exist"):
        load_fit(tmp_path / "missing.safetensors", transformer, FEATURES)
    wrong = FitResult(weights=result.weights[:, :, :3], q_band_var=result.q_band_var, metadata=result.metadata)
    save_fit(path, wrong)
    with pytest.raises(UserError, match="shape"):
        load_fit(path, transformer, FEATURES)
    assert model_metadata(transformer)["fingerprint"] == result.metadata["fingerprint"]


def test_decoding_with_the_fitted_scorer(transformer, fitted):
    """A budget that holds everything gives full attention's tokens; a small one keeps the buffer fixed."""
    result, stats, _ = fitted
    prompts = [[5, 9, 14, 3, 22], [7, 7, 31]]

    def policy(budget: int) -> TriAttentionFit:
        return TriAttentionFit.create(transformer, stats, result.q_band_var, result.weights, budget=budget)

    full = generate(transformer, prompts, max_new_tokens=40, eos_ids=(), policy=FullAttention(), divide_length=16)
    roomy = generate(transformer, prompts, max_new_tokens=40, eos_ids=(), policy=policy(512), divide_length=16)
    assert roomy.token_ids == full.token_ids
    small = generate(transformer, prompts, max_new_tokens=80, eos_ids=(), policy=policy(24), divide_length=16)
    assert small.kv_cache_bytes == cache_nbytes(transformer.config, 2, 24 + 16, jnp.float32)
    assert all(len(t) == 80 for t in small.token_ids)
    with pytest.raises(UserError, match="shape"):
        TriAttentionFit.create(transformer, stats, result.q_band_var, result.weights[:, :, :2], budget=24)


def test_redundancy_weight_mixes_the_fitted_share_with_rkvs_redundancy(transformer, fitted):
    """λ > 0 ranks by (1 − λ) × the predicted share − λ × R-KV's redundancy (whose float64
    reference is in test_baselines), the sinks still kept and empty slots still last."""
    result, stats, _ = fitted
    c = transformer.config
    rng = np.random.default_rng(7)
    L, Bc, Kc, Sc = c.num_layers, 2, c.num_kv_heads, 40
    keys = rng.normal(size=(L, Bc, Kc, Sc, c.head_dim)).astype(np.float32)
    keys[:, :, :, 20] = keys[:, :, :, 12] * 1.02  # a near-copy, so the redundancy is not flat
    positions = np.broadcast_to(np.arange(Sc)[None, None, None], (L, Bc, Kc, Sc)).copy()
    positions[:, 1, :, -3:] = -1
    cache = KVCache.from_stacked(
        k=jnp.asarray(keys),
        v=jnp.asarray(rng.normal(size=keys.shape).astype(np.float32)),
        pos=jnp.asarray(positions, jnp.int32),
        cursor=Sc,
    )
    context = RoundContext(prompt_lengths=jnp.zeros(Bc, jnp.int32), position=jnp.asarray([Sc, Sc - 3]))

    def scores(weight: float) -> np.ndarray:
        policy = TriAttentionFit.create(
            transformer,
            stats,
            result.q_band_var,
            result.weights,
            budget=24,
            aggregation="per_layer_per_head",
            redundancy_weight=weight,
        )
        return np.asarray(policy.scores(cache, context))

    alone, mixed = scores(0.0), scores(0.7)
    redundancy = np.asarray(RKV().redundancy(cache))
    scored = positions >= SINK_POSITIONS  # neither sinks nor empty slots (−1)
    expected = 0.3 * np.exp(alone) - 0.7 * redundancy
    np.testing.assert_allclose(mixed[scored], expected[scored], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(mixed[~scored], alone[~scored])  # +inf sinks, −inf empty slots
    with pytest.raises(UserError, match="redundancy_weight"):
        scores(1.5)


def test_choose_scorer_keeps_the_setting_with_the_lowest_kl(transformer, fitted):
    """Blends under each aggregation without the mix, then the best of those with each mix."""
    result, stats, fit_texts = fitted
    c = transformer.config
    budget, length = 32, selection_length(32)
    rng = np.random.default_rng(6)
    documents = [(f"d{n}", rng.integers(3, c.vocab_size, size=n).tolist()) for n in (length + 20, length, length + 5)]
    mixes = (0.0, 0.7)  # of REDUNDANCY_WEIGHTS, two keep the test short
    assert set(mixes) <= set(REDUNDANCY_WEIGHTS)
    chosen = choose_scorer(
        transformer, stats, result, documents, budget=budget, redundancy_weights=mixes, batch_size=2, progress=False
    )
    meta, selection = chosen.metadata, chosen.metadata["selection"]
    mean_kl = selection["mean_kl"]

    def name(blend: float, aggregation: str, mix: float) -> str:
        return f"blend={blend:g};aggregation={aggregation};redundancy_weight={mix:g}"

    unmixed = {name(b, a, 0): (b, a) for b, a in itertools.product(BLENDS, SELECTION_AGGREGATIONS)}
    first = min(unmixed, key=mean_kl.get)
    blend, aggregation = unmixed[first]
    assert set(mean_kl) == {*unmixed, name(blend, aggregation, 0.7)}
    assert len(set(np.round(list(mean_kl.values()), 7))) > 1  # the candidates do differ
    assert name(meta["blend"], meta["aggregation"], meta["redundancy_weight"]) == min(mean_kl, key=mean_kl.get)
    prior = prior_weights(c.num_layers, c.num_heads, c.head_dim)
    np.testing.assert_allclose(
        chosen.weights, (1 - meta["blend"]) * prior + meta["blend"] * result.weights, rtol=1e-6, atol=1e-6
    )
    # Every document is cut to the shortest, and one batch of three gives the same KL as two batches.
    tokens = np.asarray([d[:length] for _, d in documents])
    assert selection["fingerprints"] == [token_fingerprint(row) for row in tokens]
    assert selection["documents"] == ["d244", "d224", "d229"]
    assert mean_kl == {n: pytest.approx(np.mean(kl)) for n, kl in selection["kl"].items()}
    reference = FullAttentionReference.of(transformer, tokens)
    policy = TriAttentionFit.create(
        transformer, stats, result.q_band_var, prior, budget=budget, protect_prompt=False, aggregation="per_head"
    )
    kl = np.mean([cell["kl"] for cell in reference.fidelity(policy)])
    assert mean_kl[name(0, "per_head", 0)] == pytest.approx(kl, rel=1e-4)
    weights = (1 - blend) * prior + blend * result.weights
    mixed = dataclasses.replace(policy, weights=jnp.asarray(weights), aggregation=aggregation, redundancy_weight=0.7)
    kl = np.mean([cell["kl"] for cell in reference.fidelity(mixed)])
    assert mean_kl[name(blend, aggregation, 0.7)] == pytest.approx(kl, rel=1e-4)
    assert mean_kl[name(blend, aggregation, 0.7)] != pytest.approx(mean_kl[first], rel=1e-4)
    # A fit's recorded aggregation and redundancy weight are the method's defaults; explicit ones
    # (0 included) still win.
    recorded = dataclasses.replace(chosen, metadata={**meta, "aggregation": "per_layer", "redundancy_weight": 0.7})
    default = build_policy(transformer, "triattention_fit", PolicySettings(budget=budget), stats=stats, fit=recorded)
    assert (default.aggregation, default.redundancy_weight) == ("per_layer", 0.7)
    explicit = build_policy(
        transformer,
        "triattention_fit",
        PolicySettings(budget=budget, aggregation="per_head", redundancy_weight=0.0),
        stats=stats,
        fit=recorded,
    )
    assert (explicit.aggregation, explicit.redundancy_weight) == ("per_head", 0.0)
    # Choosing again keeps the first choice's record, and evaluation stays off its documents too.
    again = choose_scorer(
        transformer, stats, chosen, documents[:2], budget=budget, blends=(1.0,), redundancy_weights=(), progress=False
    )
    assert again.metadata["earlier_selections"] == [selection]
    assert set(fit_document_names(again)) == {*result.metadata["documents"], "d244", "d224", "d229"}
    with pytest.raises(UserError, match="at least 224 tokens, the shortest has 200"):
        choose_scorer(transformer, stats, result, [("short", documents[0][1][:200])], budget=budget, progress=False)
    with pytest.raises(UserError, match="fitted on 1 of the documents"):
        choose_scorer(transformer, stats, result, [("fit", fit_texts[0]), *documents], budget=budget, progress=False)


def test_fitting_texts_are_never_evaluation_texts():
    """The code files `calibrate --fit` reads lie past what the evaluation's first samples read,
    and a study that would reach them is refused."""
    fitted_on = sorted(f"python_source/{f.name}" for f in stdlib_sources()[FIT_FIRST_SOURCE : FIT_FIRST_SOURCE + 4])
    evaluated = {document_name(SOURCES[s % len(SOURCES)], s // len(SOURCES)) for s in range(3 * FIT_FIRST_SOURCE)}
    assert not set(fitted_on) & evaluated
    _check_disjoint_from_fit("fidelity", range(3 * FIT_FIRST_SOURCE), fitted_on)
    with pytest.raises(UserError, match="fitted on"):
        _check_disjoint_from_fit("fidelity", range(3 * FIT_FIRST_SOURCE, 3 * FIT_FIRST_SOURCE + 3), fitted_on)


def test_results_folder_keeps_each_fits_fingerprint(tmp_path):
    """A study folder may gain triattention_fit variants, never change one's weights; methods
    may name a weights file by path."""
    method = "triattention_fit:fitted_scorer=/tmp/fits/a.fit.safetensors"
    store = ResultStore(tmp_path, {"model": "m", "fitted_scorers": {method: "aaaa"}})
    key = store.key("fidelity", method, 512, 3)
    assert store.parse_key(key) == ("fidelity", method, 512, 3)
    store.put(key, {"kl": 0.1})
    ResultStore(tmp_path, {"model": "m", "fitted_scorers": {"triattention_fit": "bbbb"}})
    reopened = ResultStore(tmp_path, {"model": "m", "fitted_scorers": {}})
    assert key in reopened.cells
    assert json.loads((tmp_path / "settings.json").read_text())["fitted_scorers"] == {
        method: "aaaa",
        "triattention_fit": "bbbb",
    }
    with pytest.raises(UserError, match="fitted_scorers"):
        ResultStore(tmp_path, {"model": "m", "fitted_scorers": {method: "cccc"}})
