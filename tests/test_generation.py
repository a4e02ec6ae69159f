"""Decoding behaviour on tiny random checkpoints: batching, EOS, sampling, compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.decoding import STREAM_STEPS, generate, teacher_force
from triattention_jax.policies import StreamingLLM
from triattention_jax.sampling import Sampler


@pytest.fixture(scope="module")
def transformer(tiny_model_dirs):
    return load_transformer(tiny_model_dirs["qwen3-tied"], dtype="float32")


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in lengths]


def test_batch_of_different_lengths_equals_single_prompts(transformer):
    prompts = _prompts([5, 40, 17])
    batched = generate(transformer, prompts, eos_ids=(), max_new_tokens=40, divide_length=16).token_ids
    for prompt, tokens in zip(prompts, batched):
        assert generate(transformer, [prompt], eos_ids=(), max_new_tokens=40, divide_length=16).token_ids[0] == tokens


def test_stops_at_eos_and_emits_nothing_after(transformer):
    prompts = _prompts([9, 30], seed=3)
    free = generate(transformer, prompts, eos_ids=(), max_new_tokens=64, divide_length=8).token_ids
    eos = free[0][5]
    rounds = []
    result = generate(transformer, prompts, max_new_tokens=64, divide_length=8, eos_ids=[eos], on_round=rounds.append)
    first = free[0].index(eos)
    assert result.token_ids[0] == free[0][: first + 1]
    if eos in free[1]:
        assert result.token_ids[1] == free[1][: free[1].index(eos) + 1]
        assert len(rounds) == -(-max(len(t) for t in result.token_ids) // 8)
    else:
        assert result.token_ids[1] == free[1]


def test_max_new_tokens_not_a_multiple_of_divide_length(transformer):
    result = generate(transformer, _prompts([7]), eos_ids=(), max_new_tokens=37, divide_length=16)
    assert result.num_generated_tokens == [37]


def test_same_seed_same_tokens_different_seed_different(transformer):
    prompts = _prompts([11, 4], seed=5)
    sampler = Sampler(temperature=1.0, top_k=50, top_p=0.95)
    first = generate(
        transformer, prompts, eos_ids=(), max_new_tokens=48, sampler=sampler, seed=7, divide_length=16
    ).token_ids
    again = generate(
        transformer, prompts, eos_ids=(), max_new_tokens=48, sampler=sampler, seed=7, divide_length=16
    ).token_ids
    other = generate(
        transformer, prompts, eos_ids=(), max_new_tokens=48, sampler=sampler, seed=8, divide_length=16
    ).token_ids
    greedy = generate(transformer, prompts, eos_ids=(), max_new_tokens=48, divide_length=16).token_ids
    assert first == again
    assert first != other
    assert first != greedy


def test_top_k_one_is_greedy(transformer):
    prompts = _prompts([13])
    sampled = generate(
        transformer, prompts, eos_ids=(), max_new_tokens=24, sampler=Sampler(temperature=1.0, top_k=1), seed=3
    )
    assert sampled.token_ids == generate(transformer, prompts, eos_ids=(), max_new_tokens=24).token_ids


def _draws(sampler: Sampler, logits: np.ndarray, keys: jax.Array) -> np.ndarray:
    """(len(keys), batch) tokens: one draw per key, all in one compiled call (op by op, 300
    draws took over a minute)."""
    return np.asarray(jax.jit(jax.vmap(lambda key: sampler(jnp.asarray(logits), key)))(keys))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 400)
    draws = set(_draws(Sampler(temperature=1.0, top_p=0.75), logits, keys)[:, 0].tolist())
    assert draws == {0, 1}


def test_top_k_draws_only_the_k_largest():
    logits = np.random.default_rng(0).normal(size=(2, 300)).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), 300)
    draws = _draws(Sampler(temperature=3.0, top_k=5), logits, keys)
    for row in range(2):
        assert set(draws[:, row]) == set(np.argsort(logits[row])[-5:])


def test_many_rounds_compile_nothing_new(transformer, compiles):
    prompts = _prompts([10, 12])
    after_each_round = []
    long_run = generate(
        transformer,
        prompts,
        eos_ids=(),
        max_new_tokens=200,
        divide_length=8,
        on_round=lambda _: after_each_round.append(len(compiles)),
    )
    assert long_run.num_generated_tokens == [200, 200]
    assert len(after_each_round) == 25
    assert after_each_round[0] > 0
    # Everything compiles before the first round ends; the other 24 rounds compile nothing.
    assert after_each_round[-1] == after_each_round[0]
    compiles.clear()
    generate(transformer, prompts, eos_ids=(), max_new_tokens=200, divide_length=8)
    assert compiles == []


def test_decoding_stops_within_a_piece_of_the_last_eos(transformer):
    prompts = _prompts([9], seed=3)
    free = generate(transformer, prompts, eos_ids=(), max_new_tokens=64, divide_length=128).token_ids
    eos = free[0][5]
    result = generate(transformer, prompts, max_new_tokens=64, divide_length=128, eos_ids=[eos])
    assert result.token_ids[0] == free[0][: free[0].index(eos) + 1]
    assert result.num_decode_steps == STREAM_STEPS  # not the whole 128-step round


def test_streaming_reports_every_piece_and_evicts_as_whole_rounds(transformer):
    prompts = _prompts([9, 30], seed=4)
    policy = StreamingLLM(budget=48, protect_prompt=False, window=0)
    whole = generate(transformer, prompts, eos_ids=(), max_new_tokens=160, divide_length=32, policy=policy)
    assert whole.num_decode_steps == 160
    seen = []
    streamed = generate(
        transformer,
        prompts,
        eos_ids=(),
        max_new_tokens=160,
        divide_length=32,
        policy=policy,
        on_round=lambda generated: seen.append(len(generated[0])),
    )
    assert seen == list(range(STREAM_STEPS, 161, STREAM_STEPS))
    assert streamed.token_ids == whole.token_ids
    assert streamed.kv_cache_bytes == whole.kv_cache_bytes


def test_teacher_force_targets_only_picks_each_next_token(transformer):
    tokens = np.asarray(_prompts([150], seed=9))
    full = teacher_force(transformer, tokens, prefill_length=5, divide_length=32)
    picked = teacher_force(transformer, tokens, prefill_length=5, divide_length=32, targets_only=True)
    np.testing.assert_array_equal(picked, np.take_along_axis(full[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0])
