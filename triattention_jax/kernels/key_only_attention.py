"""Length-aware decode attention over a K-only (slim) cache layer: two Pallas kernels.

A K-only layer caches every head's key before RoPE, slot-major (B, S, H, hd), and recovers
the values from Σ_s p_{h,s}·k_s, a sum over the whole D = H·hd-wide key for every head h
(see `slim.py`). The XLA path reduces over every slot of the buffer, so a step costs what
the last step of the generation costs. Here both reductions stop at the cache's cursor:

1. `_scores_kernel`, one program per (row, group of heads, split): rotates the keys to
   their positions inside the reduction and writes its heads' masked, scaled scores
   (B, H, S) float32.
2. `_sums_kernel`, one program per (row, column tile, split): an online softmax over those
   scores and Σ_s exp(score_s − m)·k_s for all heads at once, a (heads × slots) by
   (slots × tile) matrix product, so each key byte is read once here.

Each key is read twice in all, the bytes of a standard K+V step: a one-read step needs
every head's probabilities and the (H, D) float32 accumulator on chip at once, more than
one multiprocessor holds (see WORKSPACE, "Slim attention at speed").

Compiled (Triton) on GPUs; elsewhere Pallas interpret mode, for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from triattention_jax.kernels.decode_attention import (
    MASK_VALUE,
    MIN_ROWS,
    TARGET_PROGRAMS,
    block_size,
    merge_splits,
    online_softmax,
    split_range,
    triton_params,
)

# Columns of the key per program of the second kernel: its float32 accumulator is
# (heads, COLUMN_TILE), 32 KiB for 32 heads.
COLUMN_TILE = 256


def _precision(dtype: jnp.dtype) -> lax.Precision | None:
    """float32 caches keep float32 products (the matrix units' default would be tf32)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _scores_kernel(
    length_ref,
    query_pos_ref,
    q_ref,
    k_ref,
    pos_ref,
    inv_freq_ref,
    scores_ref,
    *,
    block,
    splits,
    scale,
    scaling,
    unroll_heads,
):
    """One (row, group of heads, split) program: its heads' scores over its share of slots
    [0, length).

    The rotation's angles depend on the slot only, so each block's cos and sin are computed
    once for the group's heads (per head, they cost more than the step's reads). Each
    iteration of the loop over heads handles `unroll_heads` of them, whose loads are then
    independent instructions the compiler may issue together."""
    length = length_ref[()]
    query_pos = query_pos_ref[()]
    start, num_blocks = split_range(length, splits, block, pl.program_id(2))
    heads, head_dim = k_ref.shape[1], k_ref.shape[2]
    half = head_dim // 2
    inv_freq = inv_freq_ref[...]

    def body(index, carry):
        first = pl.multiple_of(start + index * block, block)
        key_pos = pos_ref[pl.ds(first, block)]
        angles = jnp.maximum(key_pos, 0).astype(jnp.float32)[:, None] * inv_freq[None, :]
        cos, sin = jnp.cos(angles) * scaling, jnp.sin(angles) * scaling
        slot = first + lax.broadcasted_iota(jnp.int32, (block,), 0)
        visible = (slot < length) & (key_pos >= 0) & (key_pos <= query_pos)

        def some_heads(index, carry):
            for offset in range(unroll_heads):
                h = index * unroll_heads + offset
                k_first = k_ref[pl.ds(first, block), h, pl.ds(0, half)].astype(jnp.float32)
                k_second = k_ref[pl.ds(first, block), h, pl.ds(half, half)].astype(jnp.float32)
                q_first, q_second = q_ref[h, pl.ds(0, half)], q_ref[h, pl.ds(half, half)]
                # RoPE's rotate-half form: (k1·cos − k2·sin, k2·cos + k1·sin), dotted with the query.
                scores = jnp.sum((k_first * cos - k_second * sin) * q_first[None, :], axis=1)
                scores += jnp.sum((k_second * cos + k_first * sin) * q_second[None, :], axis=1)
                scores_ref[h, pl.ds(first, block)] = jnp.where(visible, scale * scores, MASK_VALUE)
            return carry

        return lax.fori_loop(0, heads // unroll_heads, some_heads, carry)

    lax.fori_loop(0, num_blocks, body, 0)


def _sums_kernel(length_ref, scores_ref, k_ref, acc_ref, max_ref, sum_ref, *, block, splits, heads):
    """One (row, column tile, split) program: Σ_s exp(score_s − m)·k_s over its share of
    slots, for every head, on its tile of the key's columns (rows past `heads` pad the
    matrix product and see nothing)."""
    length = length_ref[()]
    start, num_blocks = split_range(length, splits, block, pl.program_id(2))
    rows = acc_ref.shape[0]
    precision = _precision(k_ref.dtype)

    def scored_block(first):
        scores = scores_ref[:, pl.ds(first, block)]
        slot = first + lax.broadcasted_iota(jnp.int32, (block,), 0)
        row = lax.broadcasted_iota(jnp.int32, (rows, block), 0)
        visible = (slot < length)[None, :] & (row < heads) & (scores > MASK_VALUE / 2)
        return scores, visible, k_ref[pl.ds(first, block), :], precision

    online_softmax(start, num_blocks, block, scored_block, acc_ref, max_ref, sum_ref)


def _splits(programs: int, num_slots: int, block: int) -> int:
    """Splits of the filled range that bring the grid to TARGET_PROGRAMS programs."""
    return max(1, min(num_slots // block, -(-TARGET_PROGRAMS // programs)))


def _column_tile(width: int) -> int:
    """The largest power of two up to COLUMN_TILE that divides the key's width."""
    tile = COLUMN_TILE
    while width % tile:
        tile //= 2
    return tile


@functools.partial(
    jax.jit,
    static_argnames=(
        "inv_freq",
        "attention_scaling",
        "scale",
        "block",
        "splits",
        "score_heads",
        "unroll_heads",
        "num_warps",
        "num_stages",
    ),
)
def key_only_attention(
    q: jax.Array,
    k: jax.Array,
    key_pos: jax.Array,
    query_pos: jax.Array,
    length: jax.Array,
    *,
    inv_freq: tuple[float, ...],
    attention_scaling: float,
    scale: float,
    block: int | None = None,
    splits: tuple[int, int] | None = None,
    score_heads: int | None = None,
    unroll_heads: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unnormalized attention of one post-RoPE query per head over the first `length` slots of
    a K-only cache layer, in the key's own space.

    q: (B, H, hd); k: (B, S, H, hd) keys before RoPE, slot-major, as the layer caches them;
    key_pos: (B, S) int32 slot positions, shared by the heads (-1: empty); query_pos: (B,);
    length: () int32, the cache's cursor; inv_freq, attention_scaling: the model's RoPE
    (`rope.Rotation`). A key is visible when its slot is below `length`, its position valid
    and not after the query's. Returns float32 sums (B, H, H·hd) = Σ_s exp(score_s − m)·k_s
    over the whole key, m (B, H) the largest visible score (or MASK_VALUE) and
    l (B, H) = Σ_s exp(score_s − m). block defaults to `block_size(S)`; splits, for the two
    kernels, to enough for TARGET_PROGRAMS programs each; score_heads: the heads of one
    scores program (a power of two dividing H; default all H: each block's rotation computed
    once); unroll_heads: heads per iteration of a scores program's loop over its group (a
    divisor of the group); num_warps / num_stages: Triton's, for both kernels.
    """
    B, S, H, hd = k.shape
    block = block or block_size(S)
    if block is None or S % block:
        raise ValueError(f"a buffer of {S} slots is not a multiple of a key block")
    width = H * hd
    tile = _column_tile(width)
    rows = max(MIN_ROWS, pl.next_power_of_2(H))
    group = score_heads or H
    if H % group or (group < H and group & (group - 1)):
        raise ValueError(f"score_heads={score_heads} must be a power of two dividing the {H} heads")
    if unroll_heads < 1 or group % unroll_heads:
        raise ValueError(f"unroll_heads={unroll_heads} must divide the {group} heads of a scores program")
    groups = H // group
    score_splits, sum_splits = splits or (_splits(B * groups, S, block), _splits(B * (width // tile), S, block))
    interpret = jax.default_backend() != "gpu"
    params = None if interpret else triton_params(num_warps, num_stages)
    length = jnp.asarray(length, jnp.int32)
    scores = pl.pallas_call(
        functools.partial(
            _scores_kernel,
            block=block,
            splits=score_splits,
            scale=scale,
            scaling=attention_scaling,
            unroll_heads=unroll_heads,
        ),
        grid=(B, groups, score_splits),
        in_specs=[
            pl.BlockSpec((), lambda b, g, j: ()),
            pl.BlockSpec((None,), lambda b, g, j: (b,)),
            pl.BlockSpec((None, group, hd), lambda b, g, j: (b, g, 0)),
            pl.BlockSpec((None, S, group, hd), lambda b, g, j: (b, 0, g, 0)),
            pl.BlockSpec((None, S), lambda b, g, j: (b, 0)),
            pl.BlockSpec((hd // 2,), lambda b, g, j: (0,)),
        ],
        # One group: every padded row, which the sums kernel masks; several: their heads' rows.
        out_specs=pl.BlockSpec((None, rows if groups == 1 else group, S), lambda b, g, j: (b, g, 0)),
        out_shape=jax.ShapeDtypeStruct((B, rows, S), jnp.float32),
        interpret=interpret,
        compiler_params=params,
        name="key_only_scores",
    )(length, query_pos.astype(jnp.int32), q.astype(jnp.float32), k, key_pos, jnp.asarray(inv_freq, jnp.float32))
    per_split = lambda b, c, j: (b, j, 0)  # noqa: E731 - index maps are lambdas by convention
    acc, row_max, total = pl.pallas_call(
        functools.partial(_sums_kernel, block=block, splits=sum_splits, heads=H),
        grid=(B, width // tile, sum_splits),
        in_specs=[
            pl.BlockSpec((), lambda b, c, j: ()),
            pl.BlockSpec((None, rows, S), lambda b, c, j: (b, 0, 0)),
            pl.BlockSpec((None, S, tile), lambda b, c, j: (b, 0, c)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, tile), lambda b, c, j: (b, j, 0, c)),
            pl.BlockSpec((None, None, rows), per_split),
            pl.BlockSpec((None, None, rows), per_split),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, sum_splits, rows, width), jnp.float32),
            jax.ShapeDtypeStruct((B, sum_splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((B, sum_splits, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=params,
        name="key_only_sums",
    )(length, scores, k.reshape(B, S, width))
    return merge_splits(acc[:, :, :H], row_max[:, :, :H], total[:, :, :H], axis=1)
