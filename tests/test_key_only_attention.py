"""The K-only (slim) cache's length-aware kernels, run in Pallas interpret mode on the CPU,
against the XLA path they replace on GPUs and against float64."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

from triattention_jax.cache import CacheLayer
from triattention_jax.model import _attention, kernel_partial, key_only_block, stored_block
from triattention_jax.rope import Rotation

SCALE = 0.25
HEAD_DIM = 16
ROTATION = Rotation(
    inv_freq=tuple(float(10000.0 ** (-2 * i / HEAD_DIM)) for i in range(HEAD_DIM // 2)), attention_scaling=1.2
)


def _case(rng: np.random.Generator, B: int, H: int, S: int, length: int):
    """A K-only layer with `length` slots written (some empty, one row's query before some of
    its keys), stale entries with valid positions past the length, weights with biases, and
    one new token per row."""
    D = H * HEAD_DIM
    keys = rng.normal(size=(B, S, H, HEAD_DIM))
    pos = np.where(np.arange(S) < length, np.arange(S) * 3, -1).astype(np.int32)
    pos = np.broadcast_to(pos, (B, S)).copy()
    pos[0, 3:9] = -1
    stale = pos.copy()
    stale[:, length:] = np.arange(length, S) * 3
    query_pos = np.full(B, 3 * length + 2, np.int32)
    query_pos[0] = 2 * length
    w = {
        "w_kv": rng.normal(size=(H, D, HEAD_DIM)) / np.sqrt(D),
        "bk": rng.normal(size=(H, HEAD_DIM)),
        "bv": rng.normal(size=(H, HEAD_DIM)),
    }
    q = rng.normal(size=(B, 1, H, HEAD_DIM))
    new_k, new_v = rng.normal(size=(2, B, H, 1, HEAD_DIM))
    return keys, pos, stale, query_pos, w, q, new_k, new_v


def _float64_reference(keys, pos, query_pos, w, q, new_k, new_v):
    """softmax over the visible cached keys (rotated in float64) and the new key, of values
    recovered as (k − b_k)·W_KV + b_v."""
    B, S, H, hd = keys.shape
    angles = np.maximum(pos, 0)[..., None] * np.asarray(ROTATION.inv_freq)
    cos, sin = (np.concatenate([f(angles)] * 2, -1)[:, :, None] * ROTATION.attention_scaling for f in (np.cos, np.sin))
    rotated = keys * cos + np.concatenate([-keys[..., hd // 2 :], keys[..., : hd // 2]], -1) * sin
    values = np.einsum("bsd,hdc->bshc", (keys - w["bk"]).reshape(B, S, H * hd), w["w_kv"]) + w["bv"]
    scores = SCALE * np.einsum("bhd,bshd->bhs", q[:, 0], rotated)
    visible = (pos >= 0) & (pos <= query_pos[:, None])
    scores = np.where(visible[:, None], scores, -np.inf)
    new_scores = SCALE * np.einsum("bhd,bhd->bh", q[:, 0], new_k[:, :, 0])
    top = np.maximum(scores.max(-1), new_scores)
    weights, new_weight = np.exp(scores - top[..., None]), np.exp(new_scores - top)
    out = np.einsum("bhs,bshc->bhc", weights, values) + new_weight[..., None] * new_v[:, :, 0]
    return out / (weights.sum(-1) + new_weight)[..., None]


@pytest.mark.parametrize(
    "H, S, length, block, splits, score_heads, unroll_heads",
    [
        (4, 128, 128, None, None, None, 4),
        (4, 192, 100, 32, (3, 2), 2, 2),
        (2, 64, 17, 16, (2, 3), None, 1),
        (8, 256, 0, None, None, None, 1),
        (8, 128, 70, 16, None, 1, 1),
    ],
)
def test_kernels_match_float64_and_the_xla_path_and_ignore_slots_past_the_length(
    H, S, length, block, splits, score_heads, unroll_heads
):
    rng = np.random.default_rng(S + length)
    B = 3
    keys, pos, stale, query_pos, w, q, new_k, new_v = _case(rng, B, H, S, length)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    weights = {name: f32(value) for name, value in w.items()}
    positions = jnp.asarray(query_pos)[:, None]
    new_block = (stored_block(f32(new_k), f32(new_v)), jnp.broadcast_to(positions[:, None, :], (B, H, 1)))

    def layer(slot_pos):
        return CacheLayer(
            k=f32(keys), v=None, pos=jnp.asarray(np.broadcast_to(slot_pos[:, None], (B, H, S))), rotation=ROTATION
        )

    # The kernels see the stale slots past the length; the XLA path masks them by position.
    partial = kernel_partial(weights, f32(q), positions, layer(stale), jnp.asarray(length), SCALE)
    if block or splits or unroll_heads > 1:
        from triattention_jax.kernels import key_only_attention

        direct = key_only_attention.key_only_attention(
            f32(q[:, 0]), f32(keys), jnp.asarray(stale), jnp.asarray(query_pos), jnp.asarray(length),
            inv_freq=ROTATION.inv_freq, attention_scaling=ROTATION.attention_scaling, scale=SCALE,
            block=block, splits=splits, score_heads=score_heads, unroll_heads=unroll_heads,
        )  # fmt: skip
        np.testing.assert_allclose(direct[2], partial.total[:, :, 0, 0, 0], rtol=1e-5)
        np.testing.assert_allclose(direct[1], partial.row_max[:, :, 0, 0, 0], rtol=1e-6)
    got, _ = _attention(f32(q), positions, [new_block], SCALE, partials=[partial])
    xla, _ = _attention(f32(q), positions, [(key_only_block(weights, layer(pos)), layer(pos).pos), new_block], SCALE)
    expected = _float64_reference(keys, pos, query_pos, w, q, new_k, new_v)
    np.testing.assert_allclose(got[:, 0], expected, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(got, xla, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"score_heads": 4}, "score_heads=4 must be a power of two dividing the 6 heads"),
        ({"score_heads": 3}, "score_heads=3 must be a power of two dividing the 6 heads"),
        ({"unroll_heads": 4}, "unroll_heads=4 must divide the 6 heads of a scores program"),
        ({"unroll_heads": 0}, "unroll_heads=0 must divide the 6 heads of a scores program"),
    ],
)
def test_bad_head_options_are_refused(options, message):
    from triattention_jax.kernels import key_only_attention

    q, k = jnp.zeros((1, 6, HEAD_DIM)), jnp.zeros((1, 64, 6, HEAD_DIM))
    with pytest.raises(ValueError, match=message):
        key_only_attention.key_only_attention(
            q, k, jnp.zeros((1, 64), jnp.int32), jnp.zeros(1, jnp.int32), jnp.asarray(8),
            inv_freq=ROTATION.inv_freq, attention_scaling=1.0, scale=SCALE, **options,
        )  # fmt: skip


def _one_read_fits() -> bool:
    from triattention_jax.kernels import key_only_one_read

    return key_only_one_read.fits(jnp.zeros((1, 64, 16, 128), jnp.bfloat16))


@pytest.mark.skipif(not _one_read_fits(), reason="the one-read kernel needs a Hopper GPU")
@pytest.mark.parametrize("H, length, splits", [(32, 150, 1), (32, 192, 2), (16, 1, None), (16, 0, 1)])
def test_one_read_kernel_matches_the_two_kernels_and_float64(H, length, splits):
    """Evicted-looking slots (shuffled positions, empty ones, stale ones past the length, a
    query before some keys), bfloat16 keys at head_dim 128: each head's Σ p·k / Σ p."""
    from triattention_jax.kernels import key_only_attention, key_only_one_read

    rng = np.random.default_rng(H + length)
    B, S, hd = 3, 192, 128
    keys = jnp.asarray(rng.normal(size=(B, S, H, hd)), jnp.bfloat16)
    pos = np.stack([rng.permutation(S) * 5 for _ in range(B)]).astype(np.int32)
    pos[0, 10:30] = -1
    query_pos = np.array([5 * S, 5 * S // 2, 5 * S], np.int32)
    q = rng.normal(size=(B, H, hd))
    inv_freq = tuple(float(5e5 ** (-2 * i / hd)) for i in range(hd // 2))
    rope = dict(inv_freq=inv_freq, attention_scaling=1.1, scale=hd**-0.5)
    args = (jnp.asarray(q, jnp.float32), keys, jnp.asarray(pos), jnp.asarray(query_pos), jnp.asarray(length, jnp.int32))
    got = key_only_one_read.key_only_one_read(*args, **rope, splits=splits)
    two = key_only_attention.key_only_attention(*args, **rope)

    k64 = np.asarray(keys, np.float64)
    angles = np.maximum(pos, 0)[..., None] * np.asarray(rope["inv_freq"])
    cos, sin = (np.concatenate([f(angles)] * 2, -1)[:, :, None] * rope["attention_scaling"] for f in (np.cos, np.sin))
    rotated = k64 * cos + np.concatenate([-k64[..., hd // 2 :], k64[..., : hd // 2]], -1) * sin
    scores = rope["scale"] * np.einsum("bhd,bshd->bhs", q, rotated)
    visible = (np.arange(S) < length) & (pos >= 0) & (pos <= query_pos[:, None])
    if not visible.any(axis=1).all():
        np.testing.assert_array_equal(np.asarray(got[2])[~visible.any(axis=1)], 0.0)
        return
    weights = np.exp(np.where(visible[:, None], scores, -np.inf) - scores.max(-1, keepdims=True))
    expected = np.einsum("bhs,bsd->bhd", weights / weights.sum(-1, keepdims=True), k64.reshape(B, S, H * hd))
    normalized = lambda sums: np.asarray(sums[0]) / np.asarray(sums[2])[..., None]  # noqa: E731
    top = np.abs(expected).max()
    assert np.abs(normalized(got) - expected).max() / top < 5e-3  # probabilities in bfloat16
    assert np.abs(normalized(got) - normalized(two)).max() / top < 5e-3
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(two[1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape, dtype, problem",
    [
        ((1, 64, 32, 64), jnp.bfloat16, "head_dim 128"),
        ((1, 64, 24, 128), jnp.bfloat16, "heads a multiple of 16 up to 32"),
        ((1, 64, 64, 128), jnp.bfloat16, "heads a multiple of 16 up to 32"),
        ((1, 100, 32, 128), jnp.bfloat16, "slots a multiple of 64"),
        ((1, 64, 32, 128), jnp.float32, "bfloat16/float16 keys"),
    ],
)
def test_one_read_kernel_refuses_shapes_it_cannot_serve(shape, dtype, problem):
    from triattention_jax.kernels import key_only_one_read

    k = jnp.zeros(shape, dtype)
    assert problem in key_only_one_read.shape_problem(k)
    assert not key_only_one_read.fits(k) and not key_only_one_read.preferred(k)
    with pytest.raises(ValueError, match="use key_only_attention"):
        key_only_one_read.key_only_one_read(
            jnp.zeros(shape[:1] + shape[2:]), k, jnp.zeros(shape[:2], jnp.int32), jnp.zeros(1, jnp.int32),
            jnp.asarray(8), inv_freq=(1.0,) * (shape[3] // 2), attention_scaling=1.0, scale=1.0,
        )  # fmt: skip


def test_one_read_is_preferred_where_it_was_measured_faster():
    """The rule's choice against every shape timed on the H200 (one layer, Llama-2-7B shape, a
    full buffer): never more than 6% slower than the other kernel, so the faster wherever the two
    differ by more (two thresholds cannot follow a crossover that moves with the buffer's length
    exactly: at batch 32 one read loses at 8,192 slots and wins at 16,384)."""
    from triattention_jax.kernels.key_only_one_read import prefers_one_read

    roughly_equal = 1.06
    rows = [
        row
        for folder in ("crossover_s25", "crossover_s26")
        for row in json.loads((REPO_ROOT / "results/gpu/issue20" / folder / "crossover.json").read_text())
    ]
    # Session 17, 2,176 slots: batch 139 1.843 against 2.437 ms, batch 8 0.160 against 0.188.
    timed = [(r["shape"][0], r["shape"][1], r["one_read"]["ms"], r["two_kernels"]["ms"]) for r in rows]
    timed += [(139, 2176, 1.843, 2.437), (8, 2176, 0.160, 0.188)]
    assert any(one < two for *_, one, two in timed) and any(one > two for *_, one, two in timed)
    for batch, slots, one, two in timed:
        chosen, other = (one, two) if prefers_one_read(batch, slots) else (two, one)
        assert chosen <= other * roughly_equal, (batch, slots, one, two)


@pytest.mark.skipif(not _one_read_fits(), reason="the one-read kernel needs a Hopper GPU")
def test_one_read_is_preferred_on_short_buffers_and_large_batches():
    from triattention_jax.kernels import key_only_one_read

    layer = lambda batch, slots: jax.ShapeDtypeStruct((batch, slots, 32, 128), jnp.bfloat16)  # noqa: E731
    assert key_only_one_read.preferred(layer(8, 2176))
    assert not key_only_one_read.preferred(layer(8, 16384))
    assert key_only_one_read.preferred(layer(78, 16384))
    assert key_only_one_read.fits(layer(8, 16384))


def test_one_read_splits_fill_the_device_when_the_batch_does_not():
    from triattention_jax.kernels.key_only_one_read import split_count

    assert split_count(139, 2176, 132) == 1  # 139 clusters: the batch fills 16 a wave
    assert split_count(8, 2176, 132) == 4  # two waves of 16 clusters
    assert split_count(1, 128, 132) == 2  # at most one split a tile
