"""Decode attention over a K-only (slim) cache layer that reads each cached key once: a Mosaic
GPU kernel on Hopper thread-block clusters.

`key_only_attention`'s two kernels read every key twice (scores, then Σ_s p_{h,s}·k_s), because
that sum needs every head's probabilities and an (H, D) float32 accumulator, more than one
multiprocessor holds. Here a cluster of PARTS blocks serves one row (and one split of its
slots). Block c owns the key's columns [c·D/PARTS, (c+1)·D/PARTS), exactly the slices of heads
c·H/PARTS …, and each of its GROUPS warpgroups half of those. For each tile of TILE slots a
warpgroup:

1. loads its columns once by TMA, double-buffered;
2. scores its own heads, the rotation to each slot's position done in registers with the
   hardware's sin and cos after a range reduction;
3. publishes the scores in shared memory, waits on one cluster barrier, and reads all heads'
   scores from the cluster's blocks (distributed shared memory);
4. updates an online softmax for every head and accumulates its columns of
   Σ_s exp(score − m)·k_s for all heads on the tensor cores, transposed:
   accᵀ (columns × H) += K_tileᵀ (columns × TILE) · Pᵀ (TILE × H), P in bfloat16 as a
   flash-attention kernel's probabilities.

Every key byte leaves HBM once. It needs a Hopper GPU (clusters, TMA, wgmma); `fits` says
when; Mosaic GPU cannot run it elsewhere, not even in interpret mode, so the CPU tests lower it
for CUDA and the GPU tests compare it with `key_only_attention` (WORKSPACE, "Slim attention at
speed", has its measurements).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from triattention_jax.kernels.decode_attention import MASK_VALUE, merge_splits, split_range

PARTS = 8  # blocks of a cluster: the portable maximum
GROUPS = 2  # warpgroups of a block: one alone spilled its accumulator's 128 registers a thread
TILE = 64  # slots a step: one warpgroup matrix tile
ROWS = 64  # the scores' rows (heads) padded to one warpgroup matrix tile
MAX_HEADS = 32  # 64 heads' keys, double-buffered, would need 324 KB of shared memory (232 KB)
HEAD_DIM = 128  # a half head is one 128-byte swizzled row of bfloat16
STAGES = 2  # TMA buffers a warpgroup: two of (TILE, D/16) keys fill the shared memory
KEY_DTYPES = (jnp.bfloat16, jnp.float16)
# Where one read beats key_only_attention's two kernels, measured on one H200 at the Llama-2-7B
# shape, one layer, a full buffer (`results/gpu/issue20/crossover_s25/`, `crossover_s26/`;
# session 17 for 2,176 slots): one read takes 0.76-0.85x the two kernels' time at 2,176 slots
# (batch 8 and 139) and 0.78-0.92x at 8,192 and 16,384 slots from batch 40 on (40, 78), but
# 1.10-1.21x at 4,224 and 1.05-1.16x at 8,192 slots at batch 8, 19 and 32, and 1.12-1.14x at
# 16,384 slots at batch 8 and 19, where the two kernels stream faster; at batch 32 and 16,384
# slots it is 0.95x. The limits are guesses in the gaps between the measured shapes
# (SHORT_BUFFER between 2,176 and 4,224 slots, LARGE_BATCH between 32 and 40); nothing was
# measured on an H100.
SHORT_BUFFER = 3072
LARGE_BATCH = 36


def shape_problem(k: jax.Array) -> str | None:
    """Why this kernel cannot serve a K-only cache layer k (B, S, H, hd), or None."""
    _, S, H, hd = k.shape
    if k.dtype not in KEY_DTYPES or hd != HEAD_DIM or H % (PARTS * GROUPS) or H > MAX_HEADS or S % TILE:
        return (
            f"key_only_one_read needs {'/'.join(np.dtype(d).name for d in KEY_DTYPES)} keys, head_dim "
            f"{HEAD_DIM}, heads a multiple of {PARTS * GROUPS} up to {MAX_HEADS} and slots a multiple of {TILE}; "
            f"got {k.dtype} keys (B, S, H, hd) = {k.shape}: use key_only_attention"
        )
    return None


def fits(k: jax.Array) -> bool:
    """Whether this kernel serves a K-only cache layer k (B, S, H, hd) on the default device,
    which must be a Hopper GPU (clusters, TMA and wgmma, as Mosaic GPU uses them)."""
    if jax.default_backend() != "gpu" or shape_problem(k):
        return False
    return getattr(jax.devices()[0], "compute_capability", "").startswith("9.")


def prefers_one_read(batch: int, slots: int) -> bool:
    """Whether one read is the faster decode step for `batch` rows of `slots` cached keys:
    on short buffers, and on long ones once the batch is large (see SHORT_BUFFER)."""
    return slots <= SHORT_BUFFER or batch >= LARGE_BATCH


def preferred(k: jax.Array) -> bool:
    """Whether a decode step over K-only cache layer k (B, S, H, hd) should take this kernel
    rather than key_only_attention's two: where it fits and `prefers_one_read`."""
    return prefers_one_read(k.shape[0], k.shape[1]) and fits(k)


def split_count(batch: int, slots: int, multiprocessors: int) -> int:
    """Splits of a row's slots: enough clusters for two waves of the device when the batch
    alone does not fill it, at most one per tile."""
    clusters = max(1, multiprocessors // PARTS)
    return max(1, min(slots // TILE, -(-2 * clusters // batch)))


def _body(
    q_gmem,
    k_gmem,
    pos_gmem,
    freq_gmem,
    bounds_gmem,
    acc_gmem,
    stats_gmem,
    q_smem,
    k_smem,
    pos_smem,
    freq_smem,
    mine0_smem,
    mine1_smem,
    all_smem,
    p_smem,
    alpha_smem,
    loaded,
    setup,
    exchange_barrier,
    *,
    heads: int,
    head_dim: int,
):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row, split, part = lax.axis_index("row"), lax.axis_index("split"), lax.axis_index("part")
    group = lax.axis_index("group")
    local = heads // PARTS // GROUPS  # this warpgroup's heads
    per_block = heads // PARTS
    width = local * head_dim
    half = head_dim // 2
    first_head = (part * GROUPS + group) * local
    columns = pl.ds(first_head * head_dim, width)
    q_mine, all_mine, p_mine, alpha_mine = (ref.at[group] for ref in (q_smem, all_smem, p_smem, alpha_smem))
    plgpu.copy_gmem_to_smem(q_gmem.at[row, pl.ds(first_head, local)], q_mine, setup.at[2 * group])
    plgpu.copy_gmem_to_smem(freq_gmem, freq_smem.at[group], setup.at[2 * group + 1])
    first_tile = bounds_gmem[row, split, 0]
    num_tiles = bounds_gmem[row, split, 1]
    plgpu.barrier_wait(setup.at[2 * group])
    plgpu.barrier_wait(setup.at[2 * group + 1])
    all_mine[...] = jnp.zeros((ROWS, TILE), jnp.float32)
    freq = plgpu.load(freq_smem.at[group], (), layout=plgpu.Layout.WGMMA.reduce(0))

    def fetch(index):
        buffer = group * STAGES + lax.rem(index, STAGES)
        slots = pl.ds((first_tile + index) * TILE, TILE)
        plgpu.copy_gmem_to_smem(k_gmem.at[row, slots, columns], k_smem.at[buffer], loaded.at[2 * buffer])
        plgpu.copy_gmem_to_smem(pos_gmem.at[row, slots], pos_smem.at[buffer], loaded.at[2 * buffer + 1])

    for ahead in range(STAGES - 1):
        pl.when(ahead < num_tiles)(functools.partial(fetch, ahead))

    def tile(index, carry):
        acc, row_max, total = carry
        buffer = group * STAGES + lax.rem(index, STAGES)
        # Scores alternate between two buffers: a peer writes one again two tiles on, after the
        # next barrier, which waits for this block's reads of it. So one barrier a tile. (0.11.2
        # lowers no peer reference at a dynamic offset: each buffer is chosen statically.)
        parity = lax.rem(index, 2)

        @pl.when(index + STAGES - 1 < num_tiles)
        def _():
            fetch(index + STAGES - 1)

        plgpu.barrier_wait(loaded.at[2 * buffer])
        plgpu.barrier_wait(loaded.at[2 * buffer + 1])
        keys = k_smem.at[buffer]
        pos = plgpu.load(pos_smem.at[buffer], (), layout=plgpu.Layout.WGMMA.reduce(1))
        angles = lax.broadcast_in_dim(jnp.maximum(pos, 0).astype(jnp.float32), (TILE, half), [0])
        angles = angles * lax.broadcast_in_dim(freq, (TILE, half), [1])
        # The hardware's sin and cos are accurate near zero: reduce to [−π, π] first.
        angles = angles - jnp.round(angles * (0.5 / np.pi)) * (2 * np.pi)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        scores = []
        for h in range(local):
            k1 = plgpu.load(keys.at[:, pl.ds(h * head_dim, half)], (), layout=plgpu.Layout.WGMMA)
            k2 = plgpu.load(keys.at[:, pl.ds(h * head_dim + half, half)], (), layout=plgpu.Layout.WGMMA)
            k1, k2 = k1.astype(jnp.float32), k2.astype(jnp.float32)
            q1 = plgpu.load(q_mine.at[h, pl.ds(0, half)], (), layout=plgpu.Layout.WGMMA.reduce(0))
            q2 = plgpu.load(q_mine.at[h, pl.ds(half, half)], (), layout=plgpu.Layout.WGMMA.reduce(0))
            q1 = lax.broadcast_in_dim(q1, (TILE, half), [1])
            q2 = lax.broadcast_in_dim(q2, (TILE, half), [1])
            # q·R(pos)k in RoPE's rotate-half form, summed over the bands.
            score = jnp.sum(cos * (k1 * q1 + k2 * q2) + sin * (k1 * q2 - k2 * q1), axis=1)
            scores.append(jnp.where(pos >= 0, score, MASK_VALUE))

        def publish(mine_smem):
            for h, score in enumerate(scores):
                mine_smem[group * local + h] = score

        def gather(mine_smem):
            # Every remote load in flight before the first store, which could alias them: each
            # waits for its answer. (0.11.2 has no remote stores.)
            received = [plgpu.cluster_ref(mine_smem, {"part": peer})[...] for peer in range(PARTS)]
            for peer, theirs in enumerate(received):
                all_mine[pl.ds(peer * per_block, per_block)] = theirs

        buffers = (mine0_smem, mine1_smem)
        for which, mine_smem in enumerate(buffers):
            pl.when(parity == which)(functools.partial(publish, mine_smem))
        plgpu.commit_smem()
        # Every warpgroup of the cluster has published this tile's scores before any reads them.
        plgpu.barrier_arrive(exchange_barrier)
        plgpu.barrier_wait(exchange_barrier)
        for which, mine_smem in enumerate(buffers):
            pl.when(parity == which)(functools.partial(gather, mine_smem))
        plgpu.commit_smem()  # the warpgroup's threads read what the others wrote
        scores = plgpu.load(all_mine, (), layout=plgpu.Layout.WGMMA, optimized=False)
        new_max = jnp.maximum(row_max, scores.max(axis=1))
        alpha = jnp.exp(row_max - new_max)
        weights = jnp.where(
            scores > MASK_VALUE / 2, jnp.exp(scores - lax.broadcast_in_dim(new_max, scores.shape, [0])), 0.0
        )
        total = total * alpha + weights.sum(axis=1)
        p_mine[...] = weights.astype(jnp.bfloat16)
        alpha_mine[...] = alpha
        plgpu.commit_smem()
        # The accumulator holds heads along its columns: the rescale goes through shared memory.
        scale = plgpu.load(alpha_mine.at[pl.ds(0, heads)], (), layout=plgpu.Layout.WGMMA.reduce(0))
        acc = acc * lax.broadcast_in_dim(scale, acc.shape, [1])

        def add_products(acc_ref):
            plgpu.wgmma(
                acc_ref,
                plgpu.transpose_ref(keys, (1, 0)),
                plgpu.transpose_ref(p_mine.at[pl.ds(0, heads)], (1, 0)),
            )

        acc = pl.run_state(add_products)(plgpu.ACC.init(acc))
        return acc, new_max, total

    init = (
        plgpu.layout_cast(jnp.zeros((width, heads), jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((ROWS,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
    )
    acc, row_max, total = lax.fori_loop(0, num_tiles, tile, init)
    all_mine[0] = row_max
    all_mine[1] = total
    plgpu.commit_smem()

    @pl.when((part == 0) & (group == 0))
    def _():
        plgpu.copy_smem_to_gmem(all_mine.at[pl.ds(0, 2)], stats_gmem.at[row, split])

    acc_gmem[row, split, columns, :] = acc
    plgpu.wait_smem_to_gmem(0)


def key_only_one_read(
    q: jax.Array,
    k: jax.Array,
    key_pos: jax.Array,
    query_pos: jax.Array,
    length: jax.Array,
    *,
    inv_freq: tuple[float, ...],
    attention_scaling: float,
    scale: float,
    splits: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`key_only_attention.key_only_attention`'s contract, one read of the keys: q (B, H, hd),
    k (B, S, H, hd) keys before RoPE, key_pos (B, S), query_pos (B,), length () int32; returns
    float32 sums (B, H, H·hd) = Σ_s exp(score_s − m)·k_s, m (B, H) and l (B, H). splits: of
    each row's slots (default `split_count` for the device). It runs where `fits(k)`; other
    platforms can only lower it for CUDA."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, S, H, hd = k.shape
    if problem := shape_problem(k):
        raise ValueError(problem)
    if splits is None:
        splits = split_count(B, S, getattr(jax.devices()[0], "core_count", 132))
    width = H * hd
    slots = jnp.arange(S)
    visible = (slots[None] < length) & (key_pos >= 0) & (key_pos <= query_pos[:, None])
    pos = jnp.where(visible, key_pos, -1).astype(jnp.int32)
    start, count = split_range(jnp.asarray(length, jnp.int32), splits, TILE, jnp.arange(splits))
    bounds = jnp.broadcast_to(jnp.stack([start // TILE, count], -1), (B, splits, 2)).astype(jnp.int32)
    q = (q.astype(jnp.float32) * (scale * attention_scaling)).reshape(B, H, hd)
    local = H // PARTS // GROUPS
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = plgpu.kernel(
        functools.partial(_body, heads=H, head_dim=hd),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        out_type=(
            jax.ShapeDtypeStruct((B, splits, width, H), jnp.float32),
            jax.ShapeDtypeStruct((B, splits, 2, ROWS), jnp.float32),
        ),
        grid=(B, splits),
        grid_names=("row", "split"),
        cluster=(PARTS,),
        cluster_names=("part",),
        num_threads=GROUPS,
        thread_name="group",
        scratch_types=[
            plgpu.SMEM((GROUPS, local, hd), jnp.float32),
            plgpu.SMEM((GROUPS * STAGES, TILE, local * hd), k.dtype, transforms=transforms),
            plgpu.SMEM((GROUPS * STAGES, TILE), jnp.int32),
            plgpu.SMEM((GROUPS, hd // 2), jnp.float32),
            plgpu.SMEM((H // PARTS, TILE), jnp.float32),
            plgpu.SMEM((H // PARTS, TILE), jnp.float32),
            plgpu.SMEM((GROUPS, ROWS, TILE), jnp.float32),
            plgpu.SMEM((GROUPS, ROWS, TILE), jnp.bfloat16, transforms=transforms),
            plgpu.SMEM((GROUPS, ROWS), jnp.float32),
            plgpu.Barrier(num_barriers=2 * GROUPS * STAGES),
            plgpu.Barrier(num_barriers=2 * GROUPS),
            plgpu.ClusterBarrier(collective_axes=("part",), num_arrivals=GROUPS),
        ],
    )
    acc, stats = kernel(q, k.reshape(B, S, width), pos, jnp.asarray(inv_freq, jnp.float32), bounds)
    acc = jnp.swapaxes(acc, -1, -2)  # (B, splits, H, D)
    return merge_splits(acc, stats[:, :, 0, :H], stats[:, :, 1, :H], axis=1)
