"""TriAttention scoring and eviction against an independent float64 NumPy implementation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from triattention_jax.cache import KVCache, cache_nbytes
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.config import RopeConfig
from triattention_jax.decoding import generate
from triattention_jax.errors import UserError
from triattention_jax.policies import FullAttention, RoundContext, TriAttention
from triattention_jax.rope import inverse_frequencies
from triattention_jax.scoring import (
    DEFAULT_OFFSETS,
    FrequencyStats,
    aggregate,
    key_scores,
    normalized_scores,
    offset_phasors,
)

L, B, K, G, HD, S = 3, 2, 2, 3, 16, 40
F = HD // 2


def reference_scores(pre_keys, positions, qm, qa, inv_freq, t0, offsets, *, trigonometric, norm_weighting, mode):
    """SPEC section 4 literally: pre-RoPE keys, explicit distances, float64 loops over offsets."""
    key_c = pre_keys[..., :F] + 1j * pre_keys[..., F:]  # (L,B,K,S,F)
    raw = np.zeros((L, B, K * G, S))
    for h in range(K * G):
        kv = h // G
        q = qm[:, h][:, None, None, :]  # (L,1,1,F)
        kc = key_c[:, :, kv]  # (L,B,S,F)
        norm_w = qa[:, h][:, None, None, :] - (np.abs(q) if norm_weighting else 0)
        total = (norm_w * np.abs(kc)).sum(-1)
        if trigonometric:
            series = np.zeros_like(total)
            for delta in offsets:
                distance = (t0[None, :, None] - positions[:, :, kv] + delta)[..., None]  # (L,B,S,1)
                series += (np.abs(q) * np.abs(kc) * np.cos(inv_freq * distance + np.angle(q) - np.angle(kc))).sum(-1)
            total = total + series / len(offsets)
        raw[:, :, h] = total
    valid = positions >= 0
    z = np.full((L, B, K * G, S), -np.inf)
    for h in range(K * G):
        mask = valid[:, :, h // G]
        for l in range(L):
            for b in range(B):
                values = raw[l, b, h][mask[l, b]]
                std = max(values.std(), 1e-6)
                z[l, b, h, mask[l, b]] = (values - values.mean()) / std
    grouped = z.reshape(L, B, K, G, S).max(3)
    if mode == "per_layer_per_head":
        return raw, grouped
    if mode == "per_head":
        combined = np.where(valid, grouped, 0).sum(0) / np.maximum(valid.sum(0), 1)
        return raw, np.broadcast_to(np.where(valid.any(0), combined, -np.inf), grouped.shape)
    return raw, np.broadcast_to(grouped.max(2, keepdims=True), grouped.shape)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    inv_freq, _ = inverse_frequencies(RopeConfig(theta=10000.0), HD)
    pre_keys = rng.normal(size=(L, B, K, S, HD)) + 0.3
    positions = np.stack([rng.permutation(3000)[:S] for _ in range(B)])  # (B,S), same in every layer/head
    positions = np.broadcast_to(positions[None, :, None], (L, B, K, S)).copy()
    positions[:, 1, :, -5:] = -1  # empty slots in row 1
    t0 = np.array([3100, 3500])
    angles = positions[..., None] * inv_freq.astype(np.float64)
    c, s = np.cos(angles), np.sin(angles)
    re, im = pre_keys[..., :F], pre_keys[..., F:]
    post_keys = np.concatenate([re * c - im * s, re * s + im * c], axis=-1)
    qm = rng.normal(size=(L, K * G, F)) + 1j * rng.normal(size=(L, K * G, F))
    qa = np.abs(qm) * (1 + rng.uniform(0.05, 1.0, size=qm.shape))
    stats = FrequencyStats(
        q_mean_real=qm.real.astype(np.float32), q_mean_imag=qm.imag.astype(np.float32), q_abs_mean=qa.astype(np.float32)
    )
    return dict(
        inv_freq=inv_freq,
        pre_keys=pre_keys,
        post_keys=post_keys.astype(np.float32),
        positions=positions,
        t0=t0,
        qm=qm,
        qa=qa,
        stats=stats,
    )


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head", "per_layer"])
@pytest.mark.parametrize("trigonometric, norm_weighting", [(True, True), (False, True), (True, False)])
def test_scores_match_float64_reference(problem, mode, trigonometric, norm_weighting):
    p = problem
    offsets = DEFAULT_OFFSETS
    raw_ref, final_ref = reference_scores(
        p["pre_keys"],
        p["positions"],
        p["qm"],
        p["qa"],
        p["inv_freq"].astype(np.float64),
        p["t0"],
        offsets,
        trigonometric=trigonometric,
        norm_weighting=norm_weighting,
        mode=mode,
    )
    raw = key_scores(
        jnp.asarray(p["post_keys"]),
        p["stats"],
        jnp.asarray(p["inv_freq"]),
        jnp.asarray(offset_phasors(p["inv_freq"], offsets)),
        jnp.asarray(p["t0"]),
        trigonometric=trigonometric,
        norm_weighting=norm_weighting,
    )
    np.testing.assert_allclose(np.asarray(raw), raw_ref, atol=2e-3 * np.abs(raw_ref).max())
    valid = jnp.asarray(p["positions"] >= 0)
    final = np.asarray(aggregate(normalized_scores(raw, valid, K), valid, mode))
    finite = np.isfinite(final_ref)
    assert (np.isfinite(final) == finite).all()
    np.testing.assert_allclose(final[finite], final_ref[finite], atol=5e-3)


def _policy(problem, **options):
    class Stub:  # the few Transformer attributes TriAttention.create reads
        config = type("C", (), {"num_layers": L, "num_heads": K * G, "head_dim": HD})
        inv_freq = jnp.asarray(problem["inv_freq"])
        attention_scaling = 1.0

    return TriAttention.create(Stub(), problem["stats"], **options)


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head", "per_layer"])
def test_compaction_keeps_top_budget_sorted_with_rows_moving_with_positions(problem, mode):
    p = problem
    budget = 24
    policy = _policy(p, budget=budget, protect_prompt=True, aggregation=mode)
    prompt_lengths = np.array([200, 0])
    values = np.random.default_rng(1).normal(size=p["post_keys"].shape).astype(np.float32)
    cache = KVCache.from_stacked(
        k=jnp.asarray(p["post_keys"]),
        v=jnp.asarray(values),
        pos=jnp.asarray(p["positions"], jnp.int32),
        cursor=jnp.asarray(S, jnp.int32),
    )
    context = RoundContext(prompt_lengths=jnp.asarray(prompt_lengths), position=jnp.asarray(p["t0"]))
    kept = policy.compact(cache, context)
    _, final_ref = reference_scores(
        p["pre_keys"],
        p["positions"],
        p["qm"],
        p["qa"],
        p["inv_freq"].astype(np.float64),
        p["t0"],
        DEFAULT_OFFSETS,
        trigonometric=True,
        norm_weighting=True,
        mode=mode,
    )
    final_ref = np.where(p["positions"] < prompt_lengths[None, :, None, None], np.inf, final_ref)
    final_ref = np.where(p["positions"] >= 0, final_ref, -np.inf)
    kept_pos = np.asarray(kept.stacked("pos"))
    assert kept_pos.shape == (L, B, K, budget)
    for l in range(L):
        for b in range(B):
            for k in range(K):
                order = np.argsort(-final_ref[l, b, k], kind="stable")
                expected = p["positions"][l, b, k][order[:budget]]
                expected_valid = np.sort(expected[expected >= 0])
                got = kept_pos[l, b, k]
                assert (np.diff(got[got >= 0]) > 0).all(), "kept slots sorted by position"
                # Ties at the budget boundary are allowed to differ only among equal scores.
                boundary = final_ref[l, b, k][order[budget - 1]]
                must_keep = p["positions"][l, b, k][final_ref[l, b, k] > boundary + 1e-3]
                assert set(must_keep) <= set(got[got >= 0])
                assert len(got[got >= 0]) == len(expected_valid)
                for slot, position in enumerate(got):
                    if position < 0:
                        continue
                    source = int(np.flatnonzero(p["positions"][l, b, k] == position)[0])
                    np.testing.assert_array_equal(np.asarray(kept.k[l])[b, k, slot], p["post_keys"][l, b, k, source])
                    np.testing.assert_array_equal(np.asarray(kept.v[l])[b, k, slot], values[l, b, k, source])
    assert int(kept.cursor) == budget
    if mode == "per_head":
        assert (kept_pos == kept_pos[:1]).all(), "per_head keeps the same tokens in every layer"
    if mode == "per_layer":
        assert (kept_pos == kept_pos[:, :, :1]).all(), "per_layer keeps the same tokens in every head"
    protected = p["positions"][0, 0, 0][(p["positions"][0, 0, 0] >= 0) & (p["positions"][0, 0, 0] < 200)]
    assert set(protected) <= set(kept_pos[0, 0, 0])


def test_window_protects_recent_tokens(problem):
    p = problem
    policy = _policy(p, budget=10, protect_prompt=False, window=6)
    cache = KVCache.from_stacked(
        k=jnp.asarray(p["post_keys"]),
        v=jnp.asarray(p["post_keys"]),
        pos=jnp.asarray(p["positions"], jnp.int32),
        cursor=jnp.asarray(S, jnp.int32),
    )
    recent_cut = np.sort(p["positions"][0, 0, 0])[-6]
    t0 = np.array([recent_cut + 6, 10**6])
    kept = np.asarray(
        policy.compact(cache, RoundContext(prompt_lengths=jnp.zeros(B, jnp.int32), position=jnp.asarray(t0))).stacked(
            "pos"
        )
    )
    recent = np.sort(p["positions"][0, 0, 0])[-6:]
    assert set(recent) <= set(kept[0, 0, 0])


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    from triattention_jax.calibration import accumulate

    transformer = load_transformer(tiny_model_dirs["qwen3-tied"], dtype="float32")
    sequences = np.random.default_rng(0).integers(3, 512, size=(4, 300)).tolist()
    return transformer, accumulate(transformer, sequences, progress=False).stats()


def test_budget_covering_everything_equals_full_attention(tiny):
    transformer, stats = tiny
    prompts = np.random.default_rng(4).integers(3, 512, size=(2, 10)).tolist()
    full = generate(transformer, prompts, eos_ids=(), max_new_tokens=100, divide_length=32)
    # Buffer 128 + 32 slots fills (the 64-slot prompt bucket holds padding) and compacts once,
    # but 10 + 100 real tokens always fit the budget, so nothing real is evicted.
    policy = TriAttention.create(transformer, stats, budget=128)
    compressed = generate(transformer, prompts, eos_ids=(), max_new_tokens=100, divide_length=32, policy=policy)
    assert compressed.token_ids == full.token_ids
    assert compressed.kv_cache_bytes == cache_nbytes(transformer.config, 2, 128 + 32, jnp.float32)


def test_constant_buffer_and_no_recompilation_over_four_budgets(tiny, compiles):
    transformer, stats = tiny
    budget, divide = 48, 16
    policy = TriAttention.create(transformer, stats, budget=budget)
    prompts = np.random.default_rng(5).integers(3, 512, size=(2, 12)).tolist()
    after_round = []
    long_run = generate(
        transformer,
        prompts,
        eos_ids=(),
        max_new_tokens=4 * budget,
        divide_length=divide,
        policy=policy,
        on_round=lambda _: after_round.append(len(compiles)),
    )
    short_run = generate(transformer, prompts, eos_ids=(), max_new_tokens=divide, divide_length=divide, policy=policy)
    assert long_run.num_generated_tokens == [4 * budget] * 2
    assert after_round[-1] == after_round[0], "rounds after the first compiled something"
    assert (
        long_run.kv_cache_bytes
        == short_run.kv_cache_bytes
        == cache_nbytes(transformer.config, 2, budget + divide, jnp.float32)
    )
    full = generate(
        transformer, prompts, eos_ids=(), max_new_tokens=4 * budget, divide_length=divide, policy=FullAttention()
    )
    assert long_run.kv_cache_bytes < full.kv_cache_bytes


def test_prompt_longer_than_budget(tiny):
    transformer, stats = tiny
    prompts = np.random.default_rng(6).integers(3, 512, size=(1, 100)).tolist()
    with pytest.raises(UserError, match="does not fit budget 64 with the prompt protected"):
        generate(
            transformer,
            prompts,
            eos_ids=(),
            max_new_tokens=8,
            policy=TriAttention.create(transformer, stats, budget=64),
        )
    result = generate(
        transformer,
        prompts,
        eos_ids=(),
        max_new_tokens=40,
        divide_length=16,
        policy=TriAttention.create(transformer, stats, budget=64, protect_prompt=False),
    )
    assert result.num_generated_tokens == [40]
    assert result.kv_cache_bytes == cache_nbytes(transformer.config, 1, 64 + 16, jnp.float32)
