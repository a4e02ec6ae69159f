"""StreamingLLM, H2O, SnapKV, R-KV and random eviction against independent NumPy references."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from triattention_jax.cache import KVCache, cache_nbytes
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.decoding import decode_round, generate, prefill
from triattention_jax.policies import H2O, RKV, FullAttention, RandomEviction, RoundContext, SnapKV, StreamingLLM
from triattention_jax.sampling import Sampler

L, B, K, G, HD, S, W = 2, 2, 2, 2, 8, 30, 4


@pytest.fixture(scope="module")
def cache_problem():
    rng = np.random.default_rng(0)
    positions = np.stack([np.sort(np.concatenate([[0, 2], 5 + rng.permutation(195)[: S - 2]])) for _ in range(B)])
    positions = np.broadcast_to(positions[None, :, None], (L, B, K, S)).copy()
    positions[:, 1, :, 3:6] = -1  # empty slots, as a shorter prompt leaves them
    keys = rng.normal(size=(L, B, K, S, HD)).astype(np.float32)
    keys[:, :, :, 10] = keys[:, :, :, 2] * 1.01  # a near-duplicate, for R-KV's redundancy
    window_positions = np.stack([positions[0, b, 0][positions[0, b, 0] >= 0][-W:] for b in range(B)])
    queries = rng.normal(size=(L, B, W, K * G, HD)).astype(np.float32)
    cache = KVCache.from_stacked(
        k=jnp.asarray(keys),
        v=jnp.asarray(keys),
        pos=jnp.asarray(positions, jnp.int32),
        cursor=jnp.asarray(S, jnp.int32),
        state={"window_queries": jnp.asarray(queries), "window_positions": jnp.asarray(window_positions, jnp.int32)},
    )
    context = RoundContext(prompt_lengths=jnp.zeros(B, jnp.int32), position=jnp.asarray(window_positions[:, -1] + 1))
    return dict(
        positions=positions, keys=keys, queries=queries, window_positions=window_positions, cache=cache, context=context
    )


def reference_window_attention(p, pool=7):
    importance = np.zeros((L, B, K, S))
    for l in range(L):
        for b in range(B):
            for k in range(K):
                pos = p["positions"][l, b, k]
                best = np.zeros(S)
                for g in range(G):
                    total = np.zeros(S)
                    for w in range(W):
                        qp = p["window_positions"][b, w]
                        visible = (pos >= 0) & (pos <= qp)
                        logits = p["keys"][l, b, k] @ p["queries"][l, b, w, k * G + g] / np.sqrt(HD)
                        weights = np.where(visible, np.exp(logits - logits[visible].max()), 0)
                        total += weights / weights.sum()
                    best = np.maximum(best, total / W)
                half = pool // 2
                importance[l, b, k] = [best[max(0, i - half) : i + half + 1].max() for i in range(S)]
    return importance


def reference_redundancy(p, threshold=0.5):
    result = np.zeros((L, B, K, S))
    for l in range(L):
        for b in range(B):
            for k in range(K):
                pos = p["positions"][l, b, k]
                ok = pos >= 0
                unit = p["keys"][l, b, k] / np.linalg.norm(p["keys"][l, b, k], axis=-1, keepdims=True)
                sim = unit @ unit.T
                np.fill_diagonal(sim, 0)
                sim[~ok] = 0
                sim[:, ~ok] = 0
                for i in range(S):
                    similar = np.flatnonzero(sim[i] > threshold)
                    if len(similar):
                        sim[i, similar[np.argmax(pos[similar])]] = 0
                column = sim.sum(0) / ok.sum()
                e = np.where(ok, np.exp(column - column[ok].max()), 0)
                result[l, b, k] = e / e.sum()
    return result


def kept_positions(policy, p):
    return np.asarray(policy.compact(p["cache"], p["context"]).stacked("pos"))


def expected_kept(scores, p, budget, protected):
    scores = np.where(protected, np.inf, scores)
    scores = np.where(p["positions"] >= 0, scores, -np.inf)
    kept = np.full((L, B, K, budget), -1)
    for index in np.ndindex(L, B, K):
        order = np.argsort(-scores[index], kind="stable")[:budget]
        chosen = np.sort(p["positions"][index][order])
        kept[index][: (chosen >= 0).sum()] = chosen[chosen >= 0]
    return kept


def test_streaming_keeps_sinks_and_the_most_recent(cache_problem):
    p = cache_problem
    kept = kept_positions(StreamingLLM(budget=12), p)
    for index in np.ndindex(L, B, K):
        valid = np.sort(p["positions"][index][p["positions"][index] >= 0])
        sinks = valid[valid < 4]
        recent = valid[valid >= 4][-(12 - len(sinks)) :]
        assert list(kept[index]) == list(sinks) + list(recent)


def test_snapkv_matches_reference(cache_problem):
    p = cache_problem
    policy = SnapKV(budget=12, window=W)
    np.testing.assert_allclose(
        np.asarray(policy.window_attention(p["cache"])), reference_window_attention(p), atol=1e-5
    )
    recent = p["positions"] >= (np.asarray(p["context"].position) - W)[None, :, None, None]
    expected = expected_kept(reference_window_attention(p), p, 12, recent)
    np.testing.assert_array_equal(kept_positions(policy, p), expected)


def test_rkv_matches_reference(cache_problem):
    p = cache_problem
    policy = RKV(budget=12, window=W)
    np.testing.assert_allclose(np.asarray(policy.redundancy(p["cache"])), reference_redundancy(p), atol=1e-5)
    scores = 0.1 * reference_window_attention(p) - 0.9 * reference_redundancy(p)
    recent = p["positions"] >= (np.asarray(p["context"].position) - W)[None, :, None, None]
    np.testing.assert_array_equal(kept_positions(policy, p), expected_kept(scores, p, 12, recent))


def test_h2o_keeps_heavy_hitters_and_the_window(cache_problem):
    p = cache_problem
    attention = np.random.default_rng(3).uniform(size=(L, B, K, S)).astype(np.float32)
    cache = dataclasses.replace(p["cache"], slot_stats={"attention": jnp.asarray(attention)})
    policy = H2O(budget=12, window=5)
    kept = np.asarray(policy.compact(cache, p["context"]).stacked("pos"))
    recent = p["positions"] >= (np.asarray(p["context"].position) - 5)[None, :, None, None]
    np.testing.assert_array_equal(kept, expected_kept(attention, p, 12, recent))
    moved = policy.compact(cache, p["context"])
    for index in np.ndindex(L, B, K):
        for slot, position in enumerate(np.asarray(moved.stacked("pos"))[index]):
            if position >= 0:
                source = int(np.flatnonzero(p["positions"][index] == position)[0])
                assert np.asarray(moved.slot_stats["attention"])[index][slot] == attention[index][source]


def test_random_keeps_budget_and_differs_between_rounds(cache_problem):
    p = cache_problem
    policy = RandomEviction(budget=12)
    first = kept_positions(policy, p)
    later = np.asarray(
        policy.compact(
            p["cache"], RoundContext(prompt_lengths=p["context"].prompt_lengths, position=p["context"].position + 128)
        ).stacked("pos")
    )
    valid = (p["positions"] >= 0).sum(-1)
    assert ((first >= 0).sum(-1) == np.minimum(valid, 12)).all()
    assert not np.array_equal(first, later)


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return load_transformer(tiny_model_dirs["llama-tied"], dtype="float32")


def test_h2o_accumulates_exactly_the_attention_each_key_received(tiny, tiny_model_dirs):
    """slot_stats['attention'] after prefill + one round equals HF's attention column sums."""
    from flax import nnx

    transformer = tiny
    prompt = np.random.default_rng(7).integers(3, 512, size=(1, 20)).astype(np.int32)
    bucket, rounds = 64, 16
    graphdef, state = nnx.split(transformer)
    policy = H2O(budget=1000, window=0)
    padded = np.zeros((1, bucket), np.int32)
    padded[:, :20] = prompt
    lengths = jnp.asarray([20], jnp.int32)
    logits, cache = prefill(graphdef, state, policy, jnp.asarray(padded), lengths, num_slots=1000 + rounds)
    from triattention_jax.decoding import DecodeState

    decode = DecodeState(
        token=jnp.argmax(logits, -1).astype(jnp.int32),
        position=lengths,
        done=jnp.zeros(1, bool),
        step=jnp.zeros((), jnp.int32),
    )
    cache, decode, emitted = decode_round(
        graphdef,
        state,
        policy,
        cache,
        decode,
        lengths,
        jax.random.key(0),
        jnp.asarray([-2]),
        sampler=Sampler(),
        divide_length=rounds,
    )
    sequence = np.concatenate([prompt[0], np.asarray(emitted)[0]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs["llama-tied"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        attentions = hf(torch.tensor(sequence[None]), output_attentions=True).attentions
    config = transformer.config
    expected = np.stack(
        [a[0].numpy().reshape(config.num_kv_heads, -1, len(sequence), len(sequence)).sum((1, 2)) for a in attentions]
    )  # (L, K, keys)
    got = np.asarray(cache.slot_stats["attention"])[:, 0]
    slots = np.concatenate([np.arange(20), bucket + np.arange(rounds)])
    np.testing.assert_allclose(got[:, :, slots], expected, rtol=1e-4, atol=1e-5)


EVICTION_POLICIES = {
    "streaming": lambda budget: StreamingLLM(budget=budget),
    "h2o": lambda budget: H2O(budget=budget, window=budget // 2),
    "snapkv": lambda budget: SnapKV(budget=budget),
    "rkv": lambda budget: RKV(budget=budget),
    "random": lambda budget: RandomEviction(budget=budget),
}


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_budget_covering_everything_equals_full_attention(tiny, name):
    prompts = np.random.default_rng(4).integers(3, 512, size=(2, 10)).tolist()
    full = generate(tiny, prompts, eos_ids=(), max_new_tokens=100, divide_length=32)
    compressed = generate(
        tiny, prompts, eos_ids=(), max_new_tokens=100, divide_length=32, policy=EVICTION_POLICIES[name](128)
    )
    assert compressed.token_ids == full.token_ids


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_buffer_is_constant_over_four_budgets(tiny, name):
    prompts = np.random.default_rng(5).integers(3, 512, size=(2, 12)).tolist()
    policy = EVICTION_POLICIES[name](48)
    long_run = generate(tiny, prompts, eos_ids=(), max_new_tokens=192, divide_length=16, policy=policy)
    short_run = generate(tiny, prompts, eos_ids=(), max_new_tokens=16, divide_length=16, policy=policy)
    assert long_run.num_generated_tokens == [192, 192]
    assert long_run.kv_cache_bytes == short_run.kv_cache_bytes
    assert long_run.kv_cache_bytes >= cache_nbytes(tiny.config, 2, 48 + 16, jnp.float32)
    assert (
        long_run.kv_cache_bytes
        < generate(
            tiny, prompts, eos_ids=(), max_new_tokens=192, divide_length=16, policy=FullAttention()
        ).kv_cache_bytes
    )
