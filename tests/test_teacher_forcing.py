"""Block teacher forcing: a round's tokens as one `extend` give the same log-probs, cache and
policy observations as feeding them one at a time through generation's decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WIDE, random_transformer
from flax import nnx

from triattention_jax.bench.presets import random_calibration, random_fit
from triattention_jax.decoding import prefill, teacher_force, teacher_forced_round
from triattention_jax.methods import PolicySettings, build_policy
from triattention_jax.policies import policy_names

DIVIDE = 16
BUDGET = 24
PREFILL = 8


@pytest.fixture(scope="module")
def transformer():
    return random_transformer(WIDE)


def _policy(name: str, transformer):
    return build_policy(
        transformer,
        name,
        PolicySettings(budget=BUDGET),
        stats=random_calibration(transformer, seed=1),
        fit=random_fit(transformer, seed=1),
    )


def _tokens(transformer, length: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(3).integers(3, transformer.config.vocab_size, size=(batch, length)).astype(np.int32)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.mark.parametrize("name", policy_names())
def test_each_round_block_equals_steps(transformer, name):
    """From the same cache, one round in block and in step mode: same log-probs, kept slots,
    K/V and every slot statistic or state array the policy carries (H2O's accumulated
    attention, SnapKV's and R-KV's recent queries, ...), over rounds that compact."""
    policy = _policy(name, transformer)
    graphdef, state = nnx.split(transformer)
    batch, rounds = 2, 4
    tokens = _tokens(transformer, PREFILL + rounds * DIVIDE, batch)
    bucket = 64
    padded = np.zeros((batch, bucket), np.int32)
    padded[:, :PREFILL] = tokens[:, :PREFILL]
    lengths = jnp.full((batch,), PREFILL, jnp.int32)
    num_slots = policy.num_slots(bucket, rounds * DIVIDE, DIVIDE)
    _, cache = prefill(graphdef, state, policy, jnp.asarray(padded), lengths, num_slots=num_slots)
    observed, compacted = False, 0
    for index in range(rounds):
        begin = PREFILL + index * DIVIDE
        chunk = jnp.asarray(tokens[:, begin : begin + DIVIDE])
        positions = jnp.broadcast_to(jnp.arange(begin, begin + DIVIDE, dtype=jnp.int32), chunk.shape)
        if not policy.evicts and cache.cursor + DIVIDE > cache.num_slots:  # full attention grows, as in teacher_force
            cache = cache.resized(int(cache.cursor) + DIVIDE)
        compacts = policy.evicts and int(cache.cursor) + DIVIDE > cache.num_slots
        results = {
            block: teacher_forced_round(
                graphdef,
                state,
                policy,
                _copy(cache),
                chunk,
                positions,
                lengths,
                divide_length=DIVIDE,
                block=block,
            )
            for block in (True, False)
        }
        (block_cache, block_logprobs), (step_cache, step_logprobs) = results[True], results[False]
        np.testing.assert_allclose(block_logprobs, step_logprobs, atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(block_cache.stacked("pos"), step_cache.stacked("pos"))
        for got, want in zip(jax.tree.leaves(block_cache), jax.tree.leaves(step_cache)):
            np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), atol=2e-5, rtol=1e-5)
        observed |= bool(block_cache.slot_stats or block_cache.state)
        compacted += compacts
        assert int(block_cache.cursor) == (BUDGET if compacts else int(cache.cursor)) + DIVIDE
        cache = block_cache
    assert observed == bool(policy.observes)
    assert compacted == (rounds - 1 if policy.evicts else 0)


# The per-round test covers every policy; the whole sequence, one policy of each kind of
# observation (none, accumulated attention, a window of recent queries) and full attention.
@pytest.mark.parametrize("name", ["full", "triattention", "h2o", "expected_attention"])
def test_teacher_force_block_equals_steps_over_compactions(transformer, name):
    """The whole sequence: 8 prefilled tokens and 88 forced, budget 24, so eviction runs at
    most rounds; the log-probs of both modes agree at every position."""
    policy = _policy(name, transformer)
    tokens = _tokens(transformer, PREFILL + 88)
    block = teacher_force(transformer, tokens, prefill_length=PREFILL, policy=policy, divide_length=DIVIDE)
    steps = teacher_force(transformer, tokens, prefill_length=PREFILL, policy=policy, divide_length=DIVIDE, block=False)
    np.testing.assert_allclose(block, steps, atol=5e-5, rtol=1e-5)
