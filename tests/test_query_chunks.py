"""Attention in query chunks (`model.ATTENTION_SCORE_BYTES`, what keeps a long prefill's scores
small): the same outputs, caches and policy observations as scoring every query at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WIDE, random_transformer
from flax import nnx

from triattention_jax import model
from triattention_jax.bench.presets import random_calibration, random_fit
from triattention_jax.cache import init_cache
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.decoding import prefill
from triattention_jax.methods import PolicySettings, build_policy
from triattention_jax.policies import policy_names
from triattention_jax.slim import slim_transformer

BATCH = 2
ROWS = 16  # queries per chunk in the chunked runs


def _whole_and_chunked(monkeypatch, run: Callable[[], Any], heads: int, keys: int) -> tuple[Any, Any]:
    """run() with every query scored at once, then in chunks of ROWS queries over `keys` keys.
    The chunk size is read when a program is traced, so run() must trace afresh (a new jit)."""
    whole = run()
    with monkeypatch.context() as patch:
        patch.setattr(model, "ATTENTION_SCORE_BYTES", ROWS * BATCH * heads * keys * 4)
        assert model.query_chunk_rows(BATCH, heads, keys) == ROWS
        chunked = run()
    return whole, chunked


def _assert_same(whole: Any, chunked: Any, atol: float = 1e-5) -> None:
    """Integers equal; floats up to rounding (the matrix products' shapes differ)."""
    assert jax.tree.structure(whole) == jax.tree.structure(chunked)
    for want, got in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        if jnp.issubdtype(want.dtype, jnp.integer):
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def transformer():
    return random_transformer(WIDE)


@pytest.mark.parametrize("name", policy_names())
def test_prefill_in_query_chunks_equals_scoring_at_once(transformer, monkeypatch, name):
    """Two prompts (50 and 37 tokens) in a 64-token bucket, 4 chunks: the same logits, and after
    the policy's start and the compaction to budget 24 the same kept slots, K/V and slot
    statistics or state (H2O's received attention, SnapKV's and R-KV's last queries, Expected
    Attention's query statistics, TriAttention's scores)."""
    policy = build_policy(
        transformer,
        name,
        PolicySettings(budget=24, protect_prompt=False),
        stats=random_calibration(transformer, seed=1),
        fit=random_fit(transformer, seed=1),
    )
    bucket, lengths = 64, np.array([50, 37], np.int32)
    rng = np.random.default_rng(5)
    tokens = np.where(np.arange(bucket) < lengths[:, None], rng.integers(3, WIDE["vocab_size"], (BATCH, bucket)), 0)
    graphdef, state = nnx.split(transformer)
    num_slots = policy.num_slots(bucket, 32, 16)

    def run():
        # A new function each time: jit caches traces by the function, even across jit objects.
        def whole_prefill(state, tokens, lengths):
            return prefill.__wrapped__(graphdef, state, policy, tokens, lengths, num_slots=num_slots)

        return jax.jit(whole_prefill)(state, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths))

    _assert_same(*_whole_and_chunked(monkeypatch, run, WIDE["num_attention_heads"], bucket))


@pytest.mark.parametrize("key_only", [False, True])
def test_extend_over_a_cache_in_query_chunks(slim_model_dirs, monkeypatch, key_only):
    """40 new tokens (the last 8 of one row padding) over a 64-slot cache holding 24: 3 chunks,
    the last one padded; every collected extra as well. A Qwen2 checkpoint with multi-head
    attention, so that the K-only cache, which recomputes V from K, is covered."""
    transformer = load_transformer(slim_model_dirs["qwen2-mha"], dtype="float32")
    if key_only:
        transformer = slim_transformer(transformer)[0]
    config = transformer.config
    graphdef, state = nnx.split(transformer)
    rng = np.random.default_rng(7)
    prompt = jnp.asarray(rng.integers(3, config.vocab_size, (BATCH, 24)), jnp.int32)
    prompt_positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), prompt.shape)
    out = transformer.extend(None, prompt, prompt_positions)
    cache = init_cache(config, BATCH, 64, transformer.dtype, values=transformer.value_layers)
    cache = cache.append(out.k, out.v, prompt_positions)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (BATCH, 40)), jnp.int32)
    positions = np.broadcast_to(np.arange(24, 64, dtype=np.int32), (BATCH, 40)).copy()
    positions[1, -8:] = -1

    def run():
        def extend(state, cache):
            return nnx.merge(graphdef, state).extend(
                cache,
                tokens,
                jnp.asarray(positions),
                collect_pre_rope=True,
                collect_rope_queries=True,
                collect_attention=True,
            )

        return jax.jit(extend)(state, cache)

    whole, chunked = _whole_and_chunked(monkeypatch, run, config.num_heads, 64 + 40)
    # A K-only layer's V goes through W_K^-1, which scales rounding by cond(W_K) (`slim.py`).
    _assert_same(whole, chunked, atol=1e-4 if key_only else 1e-5)
