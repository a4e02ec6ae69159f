"""Expected Attention, with the sequence's recent queries and with calibration statistics,
against an independent float64 NumPy reference (explicit RoPE matrices averaged over the future
positions, explicit covariance), its recent-query window, and end to end through
`build_policy` and generation on a tiny random Llama."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_tiny_model
from flax import nnx

from triattention_jax.bench.presets import random_stats
from triattention_jax.cache import EMPTY_POSITION, KVCache
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.checkpoints.stats import CalibrationResult
from triattention_jax.config import RopeConfig
from triattention_jax.decoding import DecodeState, decode_round, generate, prefill
from triattention_jax.errors import UserError
from triattention_jax.methods import PolicySettings, build_policy, parse_method
from triattention_jax.policies import ExpectedAttention, ExpectedAttentionCalibrated, RoundContext, policy_names
from triattention_jax.rope import inverse_frequencies
from triattention_jax.sampling import Sampler

L, B, K, G, HD, S, W = 2, 2, 2, 2, 8, 30, 6
SINKS = 4
# YaRN: scaled frequencies and a magnitude factor (attention_scaling ≈ 1.14) that the averaged
# rotation must carry, as the model's RoPE does.
ROPE = RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=64)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    positions = np.stack(
        [
            np.concatenate([np.arange(4), np.sort(4 + rng.permutation(190)[: S - 4])]),
            np.concatenate([[0, 2], np.sort(5 + rng.permutation(250)[: S - 2])]),
        ]
    )
    positions = np.broadcast_to(positions[None, :, None], (L, B, K, S)).copy()
    positions[:, 1, :, 6:9] = EMPTY_POSITION  # empty slots, as a shorter prompt leaves them
    keys = rng.normal(size=(L, B, K, S, HD)).astype(np.float32)
    values = rng.normal(size=(L, B, K, S, HD)).astype(np.float32) * rng.uniform(0.2, 2.0, size=(L, B, K, S, 1))
    # Row 0: six recent positions; row 1: an empty entry and sink positions, which the
    # statistics must skip.
    query_positions = np.array([[194, 195, 196, 197, 198, 199], [EMPTY_POSITION, 1, 3, 255, 256, 257]], np.int32)
    queries = (rng.normal(size=(L, B, W, K * G, HD)) + rng.normal(size=(L, 1, 1, K * G, HD))).astype(np.float32)
    cache = KVCache.from_stacked(
        k=jnp.asarray(keys),
        v=jnp.asarray(values.astype(np.float32)),
        pos=jnp.asarray(positions, jnp.int32),
        cursor=jnp.asarray(S, jnp.int32),
        state={"recent_queries": jnp.asarray(queries), "recent_positions": jnp.asarray(query_positions)},
    )
    context = RoundContext(prompt_lengths=jnp.zeros(B, jnp.int32), position=jnp.asarray([200, 258], jnp.int32))
    inv_freq, scaling = inverse_frequencies(ROPE, HD)
    return dict(
        positions=positions,
        keys=keys,
        values=values.astype(np.float32),
        queries=queries,
        query_positions=query_positions,
        cache=cache,
        context=context,
        inv_freq=inv_freq,
        scaling=scaling,
    )


def _policy(p, **options) -> ExpectedAttention:
    return ExpectedAttention(inv_freq=jnp.asarray(p["inv_freq"]), attention_scaling=p["scaling"], **options)


def rope_matrix(inv_freq: np.ndarray, scaling: float, position: int) -> np.ndarray:
    """RoPE at `position` as a matrix: band f, the complex number x[f] + i·x[f + d/2], times
    scaling·e^{iω_f·position}."""
    half = len(inv_freq)
    matrix = np.zeros((2 * half, 2 * half))
    for f, omega in enumerate(np.asarray(inv_freq, np.float64)):
        c, s = scaling * np.cos(omega * position), scaling * np.sin(omega * position)
        matrix[f, f], matrix[f, f + half] = c, -s
        matrix[f + half, f], matrix[f + half, f + half] = s, c
    return matrix


def recent_moments(p):
    """μ and Σ (biased) of each (layer, row, query head)'s window of queries past the sinks."""

    def moments(l, b, h):
        q = p["queries"][l, b, p["query_positions"][b] >= SINKS, h].astype(np.float64)
        return q.mean(axis=0), np.cov(q, rowvar=False, bias=True)

    return moments


def calibrated_moments(q_mean, band_var):
    """The calibration's μ, and Σ diagonal with σ²_f/2 on both components of band f."""

    def moments(l, b, h):
        return q_mean[l, h].astype(np.float64), np.diag(np.tile(band_var[l, h].astype(np.float64) / 2, 2))

    return moments


def reference_scores(p, moments=None, offsets=range(512), use_covariance=True, use_value_norm=True) -> np.ndarray:
    """log of the group's mean expected attention times ‖v‖, per (layer, row, KV head, slot)."""
    moments = moments or recent_moments(p)
    scores = np.zeros((L, B, K, S))
    for b in range(B):
        start = int(p["context"].position[b])
        average = np.mean([rope_matrix(p["inv_freq"], p["scaling"], start + j) for j in offsets], axis=0)
        for l in range(L):
            for k in range(K):
                pos = p["positions"][l, b, k]
                scored = pos >= SINKS
                keys = p["keys"][l, b, k].astype(np.float64)
                for g in range(G):
                    mu, sigma = moments(l, b, k * G + g)
                    logits = keys @ (average @ mu) / np.sqrt(HD)
                    if use_covariance:
                        logits += np.einsum("sd,de,se->s", keys, average @ sigma @ average.T, keys) / (2 * HD)
                    weights = np.exp(logits[scored] - logits[scored].max())
                    scores[l, b, k, scored] += weights / weights.sum() / G
                if use_value_norm:
                    scores[l, b, k] *= np.linalg.norm(p["values"][l, b, k].astype(np.float64), axis=-1)
                scores[l, b, k, (pos >= 0) & (pos < SINKS)] = np.inf
    with np.errstate(divide="ignore"):
        return np.log(scores)


@pytest.mark.parametrize("use_covariance, use_value_norm", [(True, True), (False, True), (True, False)])
def test_scores_match_reference(problem, use_covariance, use_value_norm):
    p = problem
    policy = _policy(p, use_covariance=use_covariance, use_value_norm=use_value_norm)
    got = np.asarray(policy.scores(p["cache"], p["context"]))
    assert got.dtype == np.float32 and got.shape == (L, B, K, S)
    expected = reference_scores(p, use_covariance=use_covariance, use_value_norm=use_value_norm)
    valid = p["positions"] >= 0
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_shared_token_sets_average_the_layers(problem):
    """aggregation=per_head: each KV-head index keeps one set in every layer, by the mean of
    the layers' log scores; per_layer: a set per layer, by the max over its KV heads."""
    p = problem
    expected = reference_scores(p)
    valid = p["positions"] >= 0
    shared = np.asarray(_policy(p, aggregation="per_head").scores(p["cache"], p["context"]))
    np.testing.assert_allclose(shared[valid], np.broadcast_to(expected.mean(0), expected.shape)[valid], rtol=1e-5)
    per_layer = np.asarray(_policy(p, aggregation="per_layer").scores(p["cache"], p["context"]))
    np.testing.assert_allclose(per_layer, np.broadcast_to(expected.max(2, keepdims=True), expected.shape), rtol=1e-5)


def test_future_horizon_matters(problem):
    """A short horizon is another averaged rotation: the scores follow it (and the reference)."""
    p = problem
    got = np.asarray(_policy(p, n_future_positions=7).scores(p["cache"], p["context"]))
    valid = p["positions"] >= 0
    np.testing.assert_allclose(got[valid], reference_scores(p, offsets=range(7))[valid], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[valid], reference_scores(p)[valid], rtol=1e-2)


def test_compaction_keeps_sinks_and_reference_top_budget(problem):
    p = problem
    budget = 12
    kept = np.asarray(_policy(p, budget=budget).compact(p["cache"], p["context"]).stacked("pos"))
    scores = np.where(p["positions"] >= 0, reference_scores(p), -np.inf)
    for index in np.ndindex(L, B, K):
        order = np.argsort(-scores[index], kind="stable")[:budget]
        chosen = np.sort(p["positions"][index][order])
        assert list(kept[index]) == list(chosen)
        assert {0, 2} <= set(kept[index]) and (index[1] == 1 or {0, 1, 2, 3} <= set(kept[index]))


def test_window_keeps_the_last_real_queries_over_steps_and_blocks():
    """start: the last query_window real prompt queries of each right-padded row; observe:
    T new tokens at once give the same window as one at a time."""
    rng = np.random.default_rng(1)
    window, T, H = 6, 12, K * G
    positions = np.array([np.where(np.arange(T) < n, np.arange(T), -1) for n in (10, 3)], np.int32)
    prompt = rng.normal(size=(L, B, T, H, HD)).astype(np.float32)
    policy = ExpectedAttention(inv_freq=jnp.ones(HD // 2), query_window=window)
    empty = KVCache.from_stacked(
        k=jnp.zeros((L, B, K, T, HD)), v=jnp.zeros((L, B, K, T, HD)), pos=jnp.zeros((L, B, K, T), jnp.int32), cursor=T
    )
    cache = policy.start(empty, types.SimpleNamespace(queries=jnp.asarray(prompt)), jnp.asarray(positions))
    np.testing.assert_array_equal(cache.state["recent_positions"], [[4, 5, 6, 7, 8, 9], [-1, -1, -1, 0, 1, 2]])
    np.testing.assert_array_equal(cache.state["recent_queries"][:, 0], prompt[:, 0, 4:10])
    np.testing.assert_array_equal(cache.state["recent_queries"][:, 1, 3:], prompt[:, 1, :3])
    assert dict(cache.state_axes)["recent_queries"] == ("layers", "batch", "window", "q_heads", "head_dim")

    new = rng.normal(size=(L, B, 4, H, HD)).astype(np.float32)
    new_positions = np.array([[10, 11, 12, 13], [3, 4, 5, 6]], np.int32)
    block = policy.observe(cache, types.SimpleNamespace(queries=jnp.asarray(new)), jnp.asarray(new_positions))
    steps = cache
    for t in range(4):
        out = types.SimpleNamespace(queries=jnp.asarray(new[:, :, t : t + 1]))
        steps = policy.observe(steps, out, jnp.asarray(new_positions[:, t : t + 1]))
    np.testing.assert_array_equal(block.state["recent_positions"], [[8, 9, 10, 11, 12, 13], [1, 2, 3, 4, 5, 6]])
    for name in ("recent_queries", "recent_positions"):
        np.testing.assert_array_equal(block.state[name], steps.state[name])
    np.testing.assert_array_equal(block.state["recent_queries"][:, 0, 2:], new[:, 0])


def test_registered_and_refuses_a_k_only_cache():
    assert "expected_attention" in policy_names()
    assert parse_method("expected_attention:window=8") == ("expected_attention", {"window": 8})
    policy = ExpectedAttention(inv_freq=jnp.ones(HD // 2), budget=64)
    with pytest.raises(UserError, match="K-only"):
        policy.check([10], 16, slim=True)
    without_value_norm = ExpectedAttention(inv_freq=jnp.ones(HD // 2), budget=64, use_value_norm=False)
    with pytest.raises(UserError, match="aggregation per_layer"):
        without_value_norm.check([10], 16, slim=True)
    dataclasses.replace(without_value_norm, aggregation="per_layer").check([10], 16, slim=True)
    with pytest.raises(UserError, match="n_future_positions"):
        ExpectedAttention(inv_freq=jnp.ones(HD // 2), n_future_positions=0).check([10], 16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Llama-3 RoPE scaling: the policy must take the model's scaled frequencies.
    return load_transformer(save_tiny_model(tmp_path_factory.mktemp("tiny"), "llama3-untied"), dtype="float32")


def test_build_policy_takes_the_models_rope(tiny):
    policy = build_policy(tiny, "expected_attention", PolicySettings(budget=48))
    assert isinstance(policy, ExpectedAttention)
    assert (policy.budget, policy.window, policy.protect_prompt) == (48, 0, False)
    np.testing.assert_array_equal(policy.inv_freq, np.asarray(tiny.inv_freq[...]))
    assert policy.attention_scaling == tiny.attention_scaling
    assert build_policy(tiny, "expected_attention:window=8;protect_prompt=true", PolicySettings()).window == 8


def test_budget_covering_everything_equals_full_attention(tiny):
    prompts = np.random.default_rng(4).integers(3, 512, size=(2, 10)).tolist()
    policy = build_policy(tiny, "expected_attention", PolicySettings(budget=128))
    full = generate(tiny, prompts, eos_ids=(), max_new_tokens=100, divide_length=32)
    compressed = generate(tiny, prompts, eos_ids=(), max_new_tokens=100, divide_length=32, policy=policy)
    assert compressed.token_ids == full.token_ids


def test_generation_evicts_and_keeps_sinks(tiny):
    """Prefill and rounds as `generate` runs them, budget 24: the buffer stays budget +
    divide_length, every compaction keeps the sinks, and what it keeps is not just the most
    recent tokens."""
    budget, divide, rounds = 24, 16, 6
    policy = build_policy(tiny, "expected_attention", PolicySettings(budget=budget))
    prompts = np.random.default_rng(5).integers(3, 512, size=(2, 20)).astype(np.int32)
    lengths = jnp.asarray([20, 13], jnp.int32)
    bucket = 64
    padded = np.zeros((2, bucket), np.int32)
    padded[:, :20] = prompts
    graphdef, state = nnx.split(tiny)
    num_slots = policy.num_slots(bucket, rounds * divide, divide)
    assert num_slots == budget + divide
    _, cache = prefill(graphdef, state, policy, jnp.asarray(padded), lengths, num_slots=num_slots)
    decode = DecodeState(
        token=jnp.asarray([5, 6], jnp.int32), position=lengths, done=jnp.zeros(2, bool), step=jnp.zeros((), jnp.int32)
    )
    kept_old = False
    for index in range(rounds):
        cache, decode, _ = decode_round(
            graphdef,
            state,
            policy,
            cache,
            decode,
            lengths,
            jax.random.key(0),
            jnp.asarray([-2]),
            sampler=Sampler(),
            divide_length=divide,
        )
        positions = np.asarray(cache.stacked("pos"))
        assert cache.num_slots == budget + divide
        if index:  # from the second round on, every round starts with a compaction to the budget
            assert ((positions >= 0).sum(-1) == budget + divide).all()
        assert all(set(range(SINKS)) <= set(positions[index]) for index in np.ndindex(positions.shape[:3]))
        newest = np.asarray(decode.position)[None, :, None, None]
        recent = (positions >= newest - (budget - SINKS + divide)) | (positions < SINKS)
        kept_old |= bool(np.any((positions >= 0) & ~recent))
    assert kept_old  # unlike StreamingLLM, some older tokens survive on their expected attention
    assert cache.state["recent_queries"].shape == (tiny.config.num_layers, 2, 128, tiny.config.num_heads, 16)
    run = generate(tiny, prompts.tolist(), eos_ids=(), max_new_tokens=96, divide_length=divide, policy=policy)
    assert run.num_generated_tokens == [96, 96]
    config = tiny.config
    assert run.kv_payload_bytes == 2 * config.num_layers * 2 * config.num_kv_heads * (budget + divide) * 16 * 4
    # The buffer held counts the carried queries too (here, with 40 slots, most of it).
    assert run.kv_cache_bytes > run.kv_payload_bytes + cache.state["recent_queries"].nbytes


def _calibration(seed: int = 7, layers: int = L, heads: int = K * G, head_dim: int = HD):
    rng = np.random.default_rng(seed)
    q_mean = rng.normal(size=(layers, heads, head_dim)) + 1.5
    band_var = rng.uniform(0.2, 3.0, size=(layers, heads, head_dim // 2))
    return q_mean.astype(np.float32), band_var.astype(np.float32)


@pytest.mark.parametrize("use_covariance, offsets", [(True, None), (False, None), (True, (1, 2, 4, 8, 64, 4096))])
def test_calibrated_scores_match_reference(problem, use_covariance, offsets):
    """Per (layer, KV head), and the per_head default: each KV-head index's mean over layers;
    R̄ over the next 512 positions, or over given offsets."""
    p = problem
    q_mean, band_var = _calibration()
    moments = calibrated_moments(q_mean, band_var)
    expected = reference_scores(p, moments, offsets=offsets or range(512), use_covariance=use_covariance)
    valid = p["positions"] >= 0
    for aggregation in ("per_layer_per_head", "per_head"):
        policy = ExpectedAttentionCalibrated(
            q_mean=jnp.asarray(q_mean),
            q_band_var=jnp.asarray(band_var),
            inv_freq=jnp.asarray(p["inv_freq"]),
            attention_scaling=p["scaling"],
            aggregation=aggregation,
            use_covariance=use_covariance,
            offsets=offsets,
        )
        got = np.asarray(policy.scores(p["cache"], p["context"]))
        want = expected if aggregation == "per_layer_per_head" else np.broadcast_to(expected.mean(0), expected.shape)
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    # The test's data tells the calibration's statistics from the window's (both references).
    assert not np.allclose(expected[valid], reference_scores(p)[valid], rtol=1e-2)


def pooled_moments(p, q_mean, band_var, count):
    """The window's queries and `count` draws of the calibration's Gaussian as one sample:
    its mean, and its second moment about that mean (the Gaussian's share in closed form)."""
    own, prior = recent_moments(p), calibrated_moments(q_mean, band_var)

    def moments(l, b, h):
        q = p["queries"][l, b, p["query_positions"][b] >= SINKS, h].astype(np.float64)
        prior_mean, prior_cov = prior(l, b, h)
        total = len(q) + count
        mean = (q.sum(axis=0) + count * prior_mean) / total
        shift = prior_mean - mean
        scatter = (q - mean).T @ (q - mean) + count * (prior_cov + np.outer(shift, shift))
        assert np.allclose(own(l, b, h)[0], q.mean(axis=0))
        return mean, scatter / total

    return moments


@pytest.mark.parametrize("count", [5, 10**7])
def test_prior_scores_match_reference(problem, count):
    """A calibration pooled with the window as `count` pseudo-queries; a huge count leaves the
    calibration alone (`expected_attention_calibrated`'s statistics, per layer and KV head)."""
    p = problem
    q_mean, band_var = _calibration()
    policy = _policy(p).with_prior(q_mean, band_var, count)
    got = np.asarray(policy.scores(p["cache"], p["context"]))
    valid = p["positions"] >= 0
    expected = reference_scores(p, pooled_moments(p, q_mean, band_var, count))
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    alone = reference_scores(p, calibrated_moments(q_mean, band_var))
    window = reference_scores(p)
    assert np.allclose(got[valid], alone[valid], rtol=1e-4, atol=1e-4) == (count > 1000)
    assert not np.allclose(got[valid], window[valid], rtol=1e-2)


def test_build_calibrated_from_a_calibration(tiny):
    c = tiny.config
    stats = random_stats(tiny, seed=2)
    _, band_var = _calibration(layers=c.num_layers, heads=c.num_heads, head_dim=c.head_dim)
    calibration = CalibrationResult(stats=stats, metadata={}, q_band_var=band_var)
    policy = build_policy(tiny, "expected_attention_calibrated", PolicySettings(budget=48), stats=calibration)
    assert isinstance(policy, ExpectedAttentionCalibrated) and policy.observes == frozenset()
    assert (policy.budget, policy.window, policy.protect_prompt, policy.aggregation) == (48, 0, False, "per_head")
    half = c.head_dim // 2
    np.testing.assert_array_equal(policy.q_mean[..., :half], stats.q_mean_real)
    np.testing.assert_array_equal(policy.q_mean[..., half:], stats.q_mean_imag)
    np.testing.assert_array_equal(policy.inv_freq, np.asarray(tiny.inv_freq[...]))
    assert policy.attention_scaling == tiny.attention_scaling
    variant = build_policy(tiny, "expected_attention_calibrated:aggregation=per_layer;max_offset=8", stats=calibration)
    assert (variant.aggregation, variant.offsets) == ("per_layer", (1, 2, 4, 8))
    with pytest.raises(UserError, match="query variance per band"):
        build_policy(tiny, "expected_attention_calibrated", PolicySettings(), stats=stats)
    with pytest.raises(UserError, match="K-only"):
        policy.check([10], 16, slim=True)
    without_norm = dataclasses.replace(policy, use_value_norm=False)
    with pytest.raises(UserError, match="aggregation per_layer"):
        without_norm.check([10], 16, slim=True)
    dataclasses.replace(without_norm, aggregation="per_layer").check([10], 16, slim=True)
    with pytest.raises(UserError, match="max_offset"):
        build_policy(tiny, "expected_attention_calibrated:max_offset=0", stats=calibration)
    with pytest.raises(UserError, match="offsets"):
        dataclasses.replace(policy, offsets=()).check([10], 16)


def test_build_a_prior_from_a_calibration(tiny):
    c = tiny.config
    stats = random_stats(tiny, seed=2)
    _, band_var = _calibration(layers=c.num_layers, heads=c.num_heads, head_dim=c.head_dim)
    calibration = CalibrationResult(stats=stats, metadata={}, q_band_var=band_var)
    policy = build_policy(tiny, "expected_attention:prior_count=64", PolicySettings(budget=48), stats=calibration)
    assert isinstance(policy, ExpectedAttention) and policy.prior_count == 64
    half = c.head_dim // 2
    np.testing.assert_array_equal(policy.prior_mean[..., :half], stats.q_mean_real)
    np.testing.assert_array_equal(policy.prior_variance[..., half:], band_var / 2)
    policy.check([10], 16)
    assert build_policy(tiny, "expected_attention", stats=calibration).prior_mean is None
    shared = build_policy(tiny, "expected_attention:aggregation=per_head;prior_count=8", stats=calibration)
    assert (shared.aggregation, shared.prior_count) == ("per_head", 8)
    with pytest.raises(UserError, match="unknown aggregation"):
        dataclasses.replace(shared, aggregation="per_token").check([10], 16)
    with pytest.raises(UserError, match="query variance per band"):
        build_policy(tiny, "expected_attention:prior_count=64", stats=stats)
    with pytest.raises(UserError, match="prior_count=-1"):
        dataclasses.replace(policy, prior_count=-1).check([10], 16)
    with pytest.raises(UserError, match="prior_count=64 needs a calibration"):
        dataclasses.replace(policy, prior_mean=None, prior_variance=None).check([10], 16)
    with pytest.raises(UserError, match="prior_count"):
        parse_method("expected_attention:prior_count=many")


def test_calibrated_generation(tiny):
    """A budget covering everything equals full attention; a small one keeps its buffer."""
    c = tiny.config
    _, band_var = _calibration(layers=c.num_layers, heads=c.num_heads, head_dim=c.head_dim)
    calibration = CalibrationResult(stats=random_stats(tiny, seed=2), metadata={}, q_band_var=band_var)
    prompts = np.random.default_rng(4).integers(3, 512, size=(2, 10)).tolist()
    full = generate(tiny, prompts, eos_ids=(), max_new_tokens=100, divide_length=32)
    for budget in (128, 24):
        settings = PolicySettings(budget=budget)
        policy = build_policy(tiny, "expected_attention_calibrated", settings, stats=calibration)
        run = generate(tiny, prompts, eos_ids=(), max_new_tokens=100, divide_length=32, policy=policy)
        if budget == 128:
            assert run.token_ids == full.token_ids
        else:
            assert run.kv_payload_bytes == 2 * c.num_layers * 2 * c.num_kv_heads * (budget + 32) * c.head_dim * 4
            assert run.num_generated_tokens == [100, 100] and run.token_ids != full.token_ids
