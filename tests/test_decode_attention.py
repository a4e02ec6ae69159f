"""The length-aware decode attention kernel, run in Pallas interpret mode on the CPU, against the
XLA attention path it replaces on GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WIDE, random_transformer

from triattention_jax.bench.presets import random_stats
from triattention_jax.cache import CacheLayer
from triattention_jax.decoding import generate, teacher_force
from triattention_jax.kernels import decode_attention
from triattention_jax.model import _attention, kernel_partial, stored_block
from triattention_jax.policies import FullAttention, StreamingLLM, TriAttention
from triattention_jax.slim import slim_transformer

SCALE = 0.3


def _cache(rng: np.random.Generator, B: int, K: int, S: int, hd: int, length: int):
    """K, V and positions of a cache with `length` slots written, a few of them empty
    (a shorter prompt's padding, an evicted slot), and a query position per row that comes
    before some cached keys in row 0 (causal masking)."""
    k, v = (jnp.asarray(rng.normal(size=(B, K, S, hd)), jnp.float32) for _ in range(2))
    pos = np.where(np.arange(S) < length, np.arange(S), -1).astype(np.int32)
    pos = np.broadcast_to(pos, (B, K, S)).copy()
    pos[0, :, 3:9] = -1
    pos[-1, -1, rng.integers(0, max(length, 1), 5)] = -1
    query_pos = np.full(B, length + 2, np.int32)
    query_pos[0] = length * 2 // 3
    return k, v, pos, jnp.asarray(query_pos)


@pytest.mark.parametrize(
    "G, S, length, block, splits",
    [(4, 256, 256, None, None), (2, 192, 100, 32, 3), (1, 64, 17, 16, 2), (4, 512, 333, 64, 7)],
)
def test_kernel_matches_the_xla_path_and_ignores_slots_past_the_length(G, S, length, block, splits):
    rng = np.random.default_rng(S + length)
    B, K, hd = 3, 2, 16
    k, v, pos, query_pos = _cache(rng, B, K, S, hd, length)
    q = jnp.asarray(rng.normal(size=(B, 1, K * G, hd)), jnp.float32)
    # Slots at and past the length hold stale entries with valid positions: the kernel must not see them.
    stale = pos.copy()
    stale[..., length:] = np.arange(length, S)
    acc, _, total = decode_attention.decode_attention(
        q.reshape(B, K, G, hd), k, v, jnp.asarray(stale), query_pos, jnp.asarray(length), scale=SCALE,
        block=block, splits=splits,
    )  # fmt: skip
    expected, _ = _attention(q, query_pos[:, None], [(stored_block(k, v), jnp.asarray(pos))], SCALE)
    np.testing.assert_allclose(acc / total[..., None], expected[:, 0].reshape(B, K, G, hd), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length", [0, 40, 128])
def test_kernel_partial_joins_the_new_keys_under_one_softmax(length):
    rng = np.random.default_rng(length)
    B, K, G, S, hd = 2, 2, 4, 128, 16
    k, v, pos, query_pos = _cache(rng, B, K, S, hd, length)
    q = jnp.asarray(rng.normal(size=(B, 1, K * G, hd)), jnp.float32)
    new_k, new_v = (jnp.asarray(rng.normal(size=(B, K, 1, hd)), jnp.float32) for _ in range(2))
    positions = query_pos[:, None]
    new_block = (stored_block(new_k, new_v), jnp.broadcast_to(positions[:, None, :], (B, K, 1)))
    cached = CacheLayer(k=k, v=v, pos=jnp.asarray(pos))
    expected, _ = _attention(q, positions, [(stored_block(k, v), cached.pos), new_block], SCALE)
    partial = kernel_partial({}, q, positions, cached, jnp.asarray(length), SCALE)
    got, _ = _attention(q, positions, [new_block], SCALE, partials=[partial])
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_block_size_needs_a_divisor():
    assert decode_attention.block_size(17408) == 64
    assert decode_attention.block_size(96) == 32
    assert decode_attention.block_size(1000) is None


# Multi-head attention for the K-only cache: Qwen2's biases, YaRN's attention scaling.
MHA = dict(
    WIDE,
    model_type="qwen2",
    num_key_value_heads=8,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512),
)


def _model(cache: str):
    if cache == "standard":
        return random_transformer(WIDE)
    return slim_transformer(random_transformer(MHA))[0]


def _policy(method: str, transformer):
    if method == "full":
        return FullAttention()
    if method == "streaming":
        return StreamingLLM(budget=48)
    return TriAttention.create(transformer, random_stats(transformer), budget=48, aggregation="per_layer")


@pytest.mark.parametrize(
    "cache, method",
    # Slim's full-attention and StreamingLLM paths are the same kernels as its TriAttention one.
    [("standard", "full"), ("standard", "streaming"), ("slim", "triattention")],
)
def test_decoding_with_the_kernels_gives_the_xla_tokens(cache, method, kernels_on_cpu):
    transformer = _model(cache)
    policy = _policy(method, transformer)
    prompts = [np.random.default_rng(row).integers(3, 256, size=n).tolist() for row, n in enumerate([5, 30])]
    options = dict(eos_ids=(), max_new_tokens=40, divide_length=16, policy=policy)
    with_kernel = generate(transformer, prompts, **options)
    expected_kernel = "key_only_attention" if cache == "slim" else "decode_attention"
    assert {name for name, _ in kernels_on_cpu} == {expected_kernel}, "the decode step did not use the kernel"
    tokens = np.array(prompts[1] + with_kernel.token_ids[1])[None]
    forced_kernel = teacher_force(transformer, tokens, prefill_length=30, policy=policy, divide_length=16, block=False)
    kernels_on_cpu.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_attention, "supported", lambda: False)
        jax.clear_caches()
        without = generate(transformer, prompts, **options)
        forced = teacher_force(transformer, tokens, prefill_length=30, policy=policy, divide_length=16, block=False)
    assert not kernels_on_cpu
    assert with_kernel.token_ids == without.token_ids
    np.testing.assert_allclose(forced_kernel, forced, rtol=1e-4, atol=1e-4)
