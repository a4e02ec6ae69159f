"""Length-aware decode attention over the KV cache: a Pallas kernel whose cost follows the filled length.

One decode step has one query per head. XLA's attention reads the whole buffer (a dynamic
slice of it becomes a copy before its matrix product), so on a buffer preallocated for the
whole generation a step would cost what the last step costs. This kernel reads only slots
below the cache's cursor: the grid runs over (batch, KV head, split), each program walks its
share of the filled slots in blocks with an online softmax, and the splits are combined in
XLA. Empty slots (position -1) inside the filled range are masked by position, exactly as
`model._attention` masks them.

Compiled (Triton) on GPUs; elsewhere it runs in Pallas interpret mode, which is for tests:
the model uses it only where `supported()`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Masked attention logits (here and in `model._attention`) use a finite value, so rows or splits
# with no valid key (padding) stay finite.
MASK_VALUE = -1e30
# Key blocks the kernel tries, largest first: the buffer's slots must be a multiple of one.
BLOCK_SIZES = (64, 32, 16)
# Splits of the filled range are added until the grid holds this many programs, two per
# multiprocessor of an H100/H200 (132). Past that one split per (row, KV head) is best: all
# programs then run at once, and more splits only add waves with a ragged tail (H200, one
# layer, 43 rows x 8 KV heads x 17,408 filled slots: 0.753 ms with one split, 0.889 with two,
# 0.772 with three, 0.764 with eight).
TARGET_PROGRAMS = 264
# Triton's matrix product needs at least 16 rows: the query group is padded to this.
MIN_ROWS = 16


def supported() -> bool:
    """Whether the compiled kernel runs on this backend (a GPU); elsewhere only interpreted."""
    return jax.default_backend() == "gpu"


def block_size(num_slots: int) -> int | None:
    """The key block for a buffer of `num_slots`, or None when no block size divides it."""
    return next((size for size in BLOCK_SIZES if num_slots % size == 0), None)


def split_range(length: jax.Array, splits: int, block: int, split: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The first slot and the number of blocks of split `split` of the slots [0, length), each
    split a whole number of blocks."""
    chunk = pl.cdiv(pl.cdiv(length, splits), block) * block
    start = split * chunk
    return start, pl.cdiv(jnp.maximum(jnp.minimum(start + chunk, length) - start, 0), block)


def online_softmax(start, num_blocks, block, scored_block, acc_ref, max_ref, sum_ref) -> None:
    """Σ_s exp(score_s − m)·value_s, m and Σ_s exp(score_s − m) over `num_blocks` blocks from
    slot `start`, written to the refs (acc (rows, columns), max and sum (rows,)).

    scored_block(first) gives a block's scores (rows, block) float32, which of them are visible,
    its values (block, columns) and the matrix product's precision."""
    rows, columns = acc_ref.shape

    def body(index, carry):
        acc, row_max, total = carry
        first = pl.multiple_of(start + index * block, block)
        scores, visible, values, precision = scored_block(first)
        scores = jnp.where(visible, scores, MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        correction = jnp.exp(row_max - new_max)
        weights = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
        weighted = lax.dot_general(
            weights.astype(values.dtype),
            values,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return acc * correction[:, None] + weighted, new_max, total * correction + jnp.sum(weights, axis=1)

    init = (
        jnp.zeros((rows, columns), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, row_max, total = lax.fori_loop(0, num_blocks, body, init)
    acc_ref[...] = acc
    max_ref[...] = row_max
    sum_ref[...] = total


def _kernel(
    length_ref, query_pos_ref, q_ref, k_ref, v_ref, pos_ref, acc_ref, max_ref, sum_ref, *, block, splits, scale
):
    """One (row, KV head, split) program: blocks of its share of slots [0, length)."""
    length = length_ref[()]
    query_pos = query_pos_ref[()]
    start, num_blocks = split_range(length, splits, block, pl.program_id(2))
    q = q_ref[...]
    # float32 caches keep float32 products (the matrix units' default would be tf32).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def scored_block(first):
        keys = k_ref[pl.ds(first, block), :]
        scores = scale * lax.dot_general(
            q, keys, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        key_pos = pos_ref[pl.ds(first, block)]
        slot = first + lax.broadcasted_iota(jnp.int32, (block,), 0)
        visible = ((slot < length) & (key_pos >= 0) & (key_pos <= query_pos))[None, :]
        return scores, visible, v_ref[pl.ds(first, block), :], precision

    online_softmax(start, num_blocks, block, scored_block, acc_ref, max_ref, sum_ref)


@functools.partial(jax.jit, static_argnames=("scale", "block", "splits", "num_warps", "num_stages"))
def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_pos: jax.Array,
    query_pos: jax.Array,
    length: jax.Array,
    *,
    scale: float,
    block: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unnormalized attention of one query per head over the first `length` slots of a cache.

    q: (B, K, G, hd), the G query heads of each KV head; k, v: (B, K, S, hd) as the cache
    stores them; key_pos: (B, K, S) int32 positions (-1: empty); query_pos: (B,) int32;
    length: () int32, the slots in use (the cache's cursor). A key is visible when its slot is
    below `length`, its position valid and not after the query's. Returns float32
    acc (B, K, G, hd) = Σ_s exp(score_s − m)·v_s, m (B, K, G) the largest visible score (or
    MASK_VALUE), l (B, K, G) = Σ_s exp(score_s − m): what `model._attention` merges with the
    new token's key under one softmax. block / splits default to `block_size(S)` and enough
    splits for `TARGET_PROGRAMS` programs; S must be a multiple of the block. num_warps /
    num_stages: Triton's, for tuning (the defaults were the fastest measured on an H200).
    """
    B, K, G, hd = q.shape
    S = k.shape[2]
    block = block or block_size(S)
    if block is None or S % block:
        raise ValueError(f"a buffer of {S} slots is not a multiple of a key block {BLOCK_SIZES}")
    splits = splits or max(1, min(S // block, -(-TARGET_PROGRAMS // (B * K))))
    rows = max(MIN_ROWS, pl.next_power_of_2(G))
    padded = jnp.pad(q, ((0, 0), (0, 0), (0, rows - G), (0, 0)))
    per_head = lambda b, h, j: (b, h, 0, 0)  # noqa: E731 - index maps are lambdas by convention
    out_index = lambda b, h, j: (b, h, j, 0)  # noqa: E731
    interpret = jax.default_backend() != "gpu"
    acc, row_max, total = pl.pallas_call(
        functools.partial(_kernel, block=block, splits=splits, scale=scale),
        grid=(B, K, splits),
        in_specs=[
            pl.BlockSpec((), lambda b, h, j: ()),
            pl.BlockSpec((None,), lambda b, h, j: (b,)),
            pl.BlockSpec((None, None, rows, hd), per_head),
            pl.BlockSpec((None, None, S, hd), per_head),
            pl.BlockSpec((None, None, S, hd), per_head),
            pl.BlockSpec((None, None, S), lambda b, h, j: (b, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, hd), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), out_index),
            pl.BlockSpec((None, None, None, rows), out_index),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, splits, rows, hd), jnp.float32),
            jax.ShapeDtypeStruct((B, K, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((B, K, splits, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=None if interpret else triton_params(num_warps, num_stages),
        name="decode_attention",
    )(
        jnp.asarray(length, jnp.int32),
        query_pos.astype(jnp.int32),
        padded,
        k,
        v,
        key_pos,
    )
    return merge_splits(acc[:, :, :, :G], row_max[:, :, :, :G], total[:, :, :, :G], axis=2)


def merge_splits(
    acc: jax.Array, row_max: jax.Array, total: jax.Array, *, axis: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One softmax's partial sums over several splits of the slots, merged along `axis`:
    acc (..., n) has one more trailing axis than row_max and total."""
    best = jnp.max(row_max, axis=axis)
    correction = jnp.exp(row_max - jnp.expand_dims(best, axis))
    return jnp.sum(acc * correction[..., None], axis=axis), best, jnp.sum(total * correction, axis=axis)


def triton_params(num_warps: int, num_stages: int):
    """Triton's compiler parameters (imported only when compiling for a GPU)."""
    from jax.experimental.pallas import triton as pallas_triton

    return pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
