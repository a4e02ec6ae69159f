"""The fitted TriAttention scorer: its features and group score against float64 NumPy, the fit
recovering known weights, statistics of the fit on disk, and decoding with it."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WIDE, random_transformer

from triattention_jax.bench.presets import random_stats
from triattention_jax.cache import cache_nbytes
from triattention_jax.checkpoints.stats import FitResult, load_fit, model_metadata, save_fit
from triattention_jax.config import RopeConfig
from triattention_jax.decoding import generate
from triattention_jax.errors import UserError
from triattention_jax.eval.fidelity import FullAttentionReference
from triattention_jax.eval.runner import _check_disjoint_from_fit
from triattention_jax.eval.store import ResultStore
from triattention_jax.eval.texts import FIT_FIRST_SOURCE, SOURCES, document_name, stdlib_sources
from triattention_jax.fitting import (
    BLENDS,
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
from triattention_jax.policies import FullAttention, TriAttentionFit
from triattention_jax.policies.triattention_fit import FEATURES, group_log_attention, key_features
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
    for h in range(H):
        kv = h // G
        want = np.stack(
            [
                trig[:, h],
                norm[:, h],
                (band_power[:, kv] * p["q_band_var"][h]).sum(-1) / (2 * HD),
                np.log(np.linalg.norm(p["values"][:, kv], axis=-1) + 1e-6),
                np.log1p(np.maximum(p["t0"][:, None] - p["positions"][:, kv], 0)),
                ((p["positions"][:, kv] >= 0) & (p["positions"][:, kv] < 4)).astype(float),
            ],
            axis=-1,
        )
        np.testing.assert_allclose(got[:, h], want, rtol=2e-4, atol=2e-5)


def test_group_log_attention_is_log_of_mean_softmax():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(B, H, S)) * 3
    valid = rng.uniform(size=(B, K, S)) > 0.2
    got = np.asarray(group_log_attention(jnp.asarray(scores), jnp.asarray(valid), K))
    for b in range(B):
        for kv in range(K):
            mask = valid[b, kv]
            probs = []
            for g in range(G):
                s = scores[b, kv * G + g][mask]
                probs.append(np.exp(s - s.max()) / np.exp(s - s.max()).sum())
            np.testing.assert_allclose(got[b, kv][mask], np.log(np.mean(probs, axis=0)), rtol=1e-5, atol=1e-5)
            assert np.isneginf(got[b, kv][~mask]).all()


def test_fit_recovers_the_weights_that_made_the_targets():
    """Targets drawn from the scorer's own model with known weights: the fit finds them."""
    rng = np.random.default_rng(2)
    n, t = 40, 64
    features = rng.normal(size=(n, H, t, len(FEATURES))) * rng.uniform(0.5, 4.0, size=len(FEATURES))
    truth = rng.normal(size=(H, len(FEATURES))) / features.std(axis=(0, 2))
    masks = np.arange(t)[None] < rng.integers(t // 2, t + 1, size=(n, 1))
    kv_masks = np.broadcast_to(masks[:, None], (n, K, t))
    log_q = np.asarray(group_log_attention(jnp.einsum("nhsf,hf->nhs", features, truth), jnp.asarray(kv_masks), K))
    targets = np.where(kv_masks, np.exp(log_q), 0.0)
    weights, before, after = _fit_layer(features, targets, masks, steps=1500, learning_rate=0.05, l2=0.0)
    assert after < before
    np.testing.assert_allclose(weights, truth, rtol=0.1, atol=0.05 * np.abs(truth).max())


@pytest.mark.parametrize(
    "horizon, padding, target",
    [(24, 0, "attention"), (24, 48, "attention"), (None, 0, "attention"), (None, 48, "kept")],
)
def test_targets_match_numpy(horizon, padding, target):
    """The target at each snapshot t0: the attention queries t0 .. t0 + horizon - 1 (every
    later query with horizon None) pay each key before t0, summed over the group, normalised
    (kept: uniform over the BUDGET keys with the most, at snapshots past BUDGET);
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
        mass = weights[:, t0 : T if horizon is None else t0 + horizon, :t0].sum(1)
        if target == "kept":
            top = np.argsort(-mass, axis=-1)[:, :budget]
            mass = np.zeros_like(mass)
            np.put_along_axis(mass, top, 1.0, axis=-1)
        np.testing.assert_allclose(targets[i][:, :t0], mass / mass.sum(-1, keepdims=True), rtol=2e-4, atol=1e-7)
        assert not np.any(targets[i][:, t0:]) and np.array_equal(masks[i], np.arange(T + padding) < t0)


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


def test_choose_scorer_keeps_the_blend_and_aggregation_with_the_lowest_kl(transformer, fitted):
    result, stats, fit_texts = fitted
    c = transformer.config
    budget, length = 32, selection_length(32)
    rng = np.random.default_rng(6)
    documents = [(f"d{n}", rng.integers(3, c.vocab_size, size=n).tolist()) for n in (length + 20, length, length + 5)]
    chosen = choose_scorer(transformer, stats, result, documents, budget=budget, batch_size=2, progress=False)
    selection = chosen.metadata["selection"]
    names = {f"blend={b:g};aggregation={a}" for b in BLENDS for a in SELECTION_AGGREGATIONS}
    assert set(selection["mean_kl"]) == names
    assert len(set(np.round(list(selection["mean_kl"].values()), 7))) > 1  # the candidates do differ
    best = min(selection["mean_kl"], key=selection["mean_kl"].get)
    assert best == f"blend={chosen.metadata['blend']:g};aggregation={chosen.metadata['aggregation']}"
    prior = prior_weights(c.num_layers, c.num_heads, c.head_dim)
    blend = chosen.metadata["blend"]
    np.testing.assert_allclose(chosen.weights, (1 - blend) * prior + blend * result.weights, rtol=1e-6, atol=1e-6)
    # Every document is cut to the shortest, and one batch of three gives the same KL as two batches.
    tokens = np.asarray([d[:length] for _, d in documents])
    assert selection["fingerprints"] == [token_fingerprint(row) for row in tokens]
    assert selection["documents"] == ["d244", "d224", "d229"]
    assert selection["mean_kl"] == {name: pytest.approx(np.mean(kl)) for name, kl in selection["kl"].items()}
    policy = TriAttentionFit.create(
        transformer, stats, result.q_band_var, prior, budget=budget, protect_prompt=False, aggregation="per_head"
    )
    kl = np.mean([cell["kl"] for cell in FullAttentionReference.of(transformer, tokens).fidelity(policy)])
    assert selection["mean_kl"]["blend=0;aggregation=per_head"] == pytest.approx(kl, rel=1e-4)
    # The chosen aggregation is the method's default; an explicit one still wins.
    default = build_policy(transformer, "triattention_fit", PolicySettings(budget=budget), stats=stats, fit=chosen)
    assert default.aggregation == chosen.metadata["aggregation"]
    explicit = build_policy(
        transformer, "triattention_fit", PolicySettings(budget=budget, aggregation="per_layer"), stats=stats, fit=chosen
    )
    assert explicit.aggregation == "per_layer"
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
