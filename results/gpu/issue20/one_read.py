"""Issue 20: a one-read K-only attention layer, a Mosaic GPU kernel on thread-block clusters.

A K-only step needs every head's probabilities before Σ_s p_{h,s}·k_s over the whole D-wide key,
and the (H, D) float32 accumulator is larger than one multiprocessor holds. Here a cluster of
PARTS blocks serves one row (and one split of its slots): block c owns the key's columns
[c·D/PARTS, (c+1)·D/PARTS), which are exactly the key slices of heads c·H/PARTS … : for each tile
of TILE slots it loads its columns once (TMA), scores its own heads (rotation in registers),
publishes those scores in its shared memory, waits on a cluster barrier, gathers every head's
scores from its peers (distributed shared memory), and accumulates its columns of
Σ_s exp(score − m)·k_s for all heads with the tensor cores, transposed: accᵀ (D/PARTS, H) +=
K_tileᵀ (D/PARTS × TILE) · Pᵀ (TILE × H). Every key byte leaves HBM once.

Same contract as `kernels.key_only_attention.key_only_attention` (sums (B, H, D), max (B, H),
total (B, H)); the probabilities enter the tensor cores in bfloat16, as a flash-attention
kernel's do.

    PYTHONPATH=. python results/gpu/issue20/one_read.py            # CPU: lowers for CUDA
    PYTHONPATH=. JAX_PLATFORMS=cuda python results/gpu/issue20/one_read.py OUT.json --batch 139 --compare
    ... --options '{"stages": 3}'      one_read_attention's options (see _body for the diagnostics)
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from triattention_jax.kernels.decode_attention import MASK_VALUE, merge_splits

from scores_sweep import random_layer_inputs  # beside this script

PARTS = 8
GROUPS = 2  # warpgroups a block
TILE = 64
ROWS = 64  # the scores' rows padded to one warpgroup's matrix tile
TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


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
    heads,
    head_dim,
    splits,
    stages,
    rotate,
    exchange,
    accumulate,
    fast_math,
):
    """Each of the block's GROUPS warpgroups owns 1/GROUPS of its columns: its own loads,
    heads and accumulator (the whole one took 128 registers a thread in one warpgroup, which
    spilled; two warpgroups also hide each other's latencies).
    fast_math: the hardware's approximate sin, cos and exp (sin.approx.f32 …) after a range
    reduction, instead of the precise library calls. rotate / exchange / accumulate False
    leave out the rotation, the cluster's exchange of scores, the tensor-core accumulation
    (wrong results: a timing diagnostic only)."""
    row, split, part = lax.axis_index("row"), lax.axis_index("split"), lax.axis_index("part")
    group = lax.axis_index("group")
    local = heads // PARTS // GROUPS  # this warpgroup's heads
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
    freq = plgpu.load(freq_smem, (group,), layout=plgpu.Layout.WGMMA.reduce(0))

    def fetch(index):
        buffer = group * stages + lax.rem(index, stages)
        slots = pl.ds((first_tile + index) * TILE, TILE)
        plgpu.copy_gmem_to_smem(k_gmem.at[row, slots, columns], k_smem.at[buffer], loaded.at[2 * buffer])
        plgpu.copy_gmem_to_smem(pos_gmem.at[row, slots], pos_smem.at[buffer], loaded.at[2 * buffer + 1])

    for ahead in range(stages - 1):
        pl.when(ahead < num_tiles)(functools.partial(fetch, ahead))

    def tile(index, carry):
        acc, row_max, total = carry
        buffer = group * stages + lax.rem(index, stages)
        # Scores alternate between two buffers: a peer overwrites one two tiles on, after the
        # next barrier, which waits for this block's reads of it. So one barrier per tile. (A
        # dynamically offset peer reference does not lower on 0.11.2: each buffer is static.)
        parity = lax.rem(index, 2)
        buffers = (mine0_smem, mine1_smem)

        @pl.when(index + stages - 1 < num_tiles)
        def _():
            fetch(index + stages - 1)

        plgpu.barrier_wait(loaded.at[2 * buffer])
        plgpu.barrier_wait(loaded.at[2 * buffer + 1])
        keys = k_smem.at[buffer]
        pos = plgpu.load(pos_smem, (buffer,), layout=plgpu.Layout.WGMMA.reduce(1))
        angles = lax.broadcast_in_dim(jnp.maximum(pos, 0).astype(jnp.float32), (TILE, half), [0])
        angles = angles * lax.broadcast_in_dim(freq, (TILE, half), [1])
        if rotate:
            if fast_math:
                # The hardware's sin/cos are accurate near zero: reduce to [−π, π] first.
                angles = angles - jnp.round(angles * (0.5 / np.pi)) * (2 * np.pi)
            cos, sin = jnp.cos(angles), jnp.sin(angles)
        scores = []
        for h in range(local):
            k1 = plgpu.load(keys, (slice(None), pl.ds(h * head_dim, half)), layout=plgpu.Layout.WGMMA)
            k2 = plgpu.load(keys, (slice(None), pl.ds(h * head_dim + half, half)), layout=plgpu.Layout.WGMMA)
            k1, k2 = k1.astype(jnp.float32), k2.astype(jnp.float32)
            q1 = plgpu.load(q_mine, (h, pl.ds(0, half)), layout=plgpu.Layout.WGMMA.reduce(0))
            q2 = plgpu.load(q_mine, (h, pl.ds(half, half)), layout=plgpu.Layout.WGMMA.reduce(0))
            q1 = lax.broadcast_in_dim(q1, (TILE, half), [1])
            q2 = lax.broadcast_in_dim(q2, (TILE, half), [1])
            # q·R(pos)k with RoPE's rotate-half form, summed per band then over the bands.
            if rotate:
                score = jnp.sum(cos * (k1 * q1 + k2 * q2) + sin * (k1 * q2 - k2 * q1), axis=1)
            else:
                score = jnp.sum(k1 * q1 + k2 * q2, axis=1)
            scores.append(jnp.where(pos >= 0, score, MASK_VALUE))
        for which, mine_smem in enumerate(buffers):

            @pl.when(parity == which)
            def _():
                for h, score in enumerate(scores):
                    mine_smem[group * local + h] = score

        plgpu.commit_smem()
        # Every warpgroup of the cluster has published this tile's scores before any reads them.
        if exchange:
            plgpu.barrier_arrive(exchange_barrier)
            plgpu.barrier_wait(exchange_barrier)
        per_block = heads // PARTS
        for which, mine_smem in enumerate(buffers):

            @pl.when(parity == which)
            def _():
                if exchange:
                    # Every remote load in flight before the first store, which could alias
                    # them: each waits for its answer. (0.11.2 has no remote stores.)
                    received = [plgpu.cluster_ref(mine_smem, {"part": peer})[...] for peer in range(PARTS)]
                    for peer, theirs in enumerate(received):
                        all_mine[pl.ds(peer * per_block, per_block)] = theirs
                else:
                    all_mine[pl.ds(0, per_block)] = mine_smem[...]

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
        scale = plgpu.load(alpha_mine, (pl.ds(0, heads),), layout=plgpu.Layout.WGMMA.reduce(0))
        acc = acc * lax.broadcast_in_dim(scale, acc.shape, [1])

        def add_products(acc_ref):
            plgpu.wgmma(
                acc_ref,
                plgpu.transpose_ref(keys, (1, 0)),
                plgpu.transpose_ref(p_mine.at[pl.ds(0, heads)], (1, 0)),
            )

        if accumulate:
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


def one_read_attention(
    q,
    k,
    key_pos,
    query_pos,
    length,
    *,
    inv_freq,
    attention_scaling,
    scale,
    splits=1,
    stages=2,
    rotate=True,
    exchange=True,
    accumulate=True,
    fast_math=True,
):
    """`key_only_attention`'s contract, one read of the keys: see the module docstring."""
    B, S, H, hd = k.shape
    if H % (PARTS * GROUPS) or H > ROWS or S % TILE:
        raise ValueError(
            f"{H} heads must divide into {PARTS} blocks of {GROUPS} warpgroups (at most {ROWS}), "
            f"{S} slots into tiles of {TILE}"
        )
    width = H * hd
    slots = jnp.arange(S)
    visible = (slots[None] < length) & (key_pos >= 0) & (key_pos <= query_pos[:, None])
    pos = jnp.where(visible, key_pos, -1).astype(jnp.int32)
    tiles = -(-jnp.asarray(length, jnp.int32) // TILE)
    per_split = -(-tiles // splits)
    first = jnp.arange(splits) * per_split
    count = jnp.clip(tiles - first, 0, per_split)
    bounds = jnp.zeros((B, splits, 2), jnp.int32).at[:, :, 0].set(first).at[:, :, 1].set(count)
    q = (q.astype(jnp.float32) * (scale * attention_scaling)).reshape(B, H, hd)
    local = H // PARTS // GROUPS
    kernel = plgpu.kernel(
        functools.partial(
            _body,
            heads=H,
            head_dim=hd,
            splits=splits,
            stages=stages,
            rotate=rotate,
            exchange=exchange,
            accumulate=accumulate,
            fast_math=fast_math,
        ),
        compiler_params=plgpu.CompilerParams(approx_math=fast_math),
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
            plgpu.SMEM((GROUPS * stages, TILE, local * hd), k.dtype, transforms=TRANSFORMS),
            plgpu.SMEM((GROUPS * stages, TILE), jnp.int32),
            plgpu.SMEM((GROUPS, hd // 2), jnp.float32),
            plgpu.SMEM((H // PARTS, TILE), jnp.float32),
            plgpu.SMEM((H // PARTS, TILE), jnp.float32),
            plgpu.SMEM((GROUPS, ROWS, TILE), jnp.float32),
            plgpu.SMEM((GROUPS, ROWS, TILE), jnp.bfloat16, transforms=TRANSFORMS),
            plgpu.SMEM((GROUPS, ROWS), jnp.float32),
            plgpu.Barrier(num_barriers=2 * GROUPS * stages),
            plgpu.Barrier(num_barriers=2 * GROUPS),
            plgpu.ClusterBarrier(collective_axes=("part",), num_arrivals=GROUPS),
        ],
    )
    acc, stats = kernel(q, k.reshape(B, S, width), pos, jnp.asarray(inv_freq, jnp.float32), bounds)
    acc = jnp.swapaxes(acc, -1, -2)  # (B, splits, H, D)
    return merge_splits(acc, stats[:, :, 0, :H], stats[:, :, 1, :H], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--splits", type=int, default=1)
    parser.add_argument("--options", default="{}", help="one_read_attention's keyword options, as JSON")
    parser.add_argument("--compare", action="store_true", help="also time key_only_attention and the roofline")
    args = parser.parse_args()
    q, keys, key_pos, query_pos, length = random_layer_inputs(args.batch, args.slots, args.heads, args.head_dim)
    hd = args.head_dim
    options = dict(
        inv_freq=tuple(float(10000.0 ** (-2 * i / hd)) for i in range(hd // 2)), attention_scaling=1.0, scale=hd**-0.5
    )
    chosen = json.loads(args.options)
    fused = jax.jit(functools.partial(one_read_attention, splits=args.splits, **options, **chosen))
    if jax.default_backend() != "gpu":
        text = fused.trace(q, keys, key_pos, query_pos, length).lower(lowering_platforms=("cuda",)).as_text()
        print(f"lowered for CUDA on {jax.default_backend()}: {len(text)} characters")
        return
    from triattention_jax.bench.speed import device_seconds, roofline
    from triattention_jax.kernels.key_only_attention import key_only_attention

    start = time.perf_counter()
    got = jax.block_until_ready(fused(q, keys, key_pos, query_pos, length))
    first_call = time.perf_counter() - start
    want = key_only_attention(q, keys, key_pos, query_pos, length, **options)
    # Compared as normalised outputs: each head's Σ p·k / Σ p.
    ratio = lambda r: r[0] / r[2][..., None]  # noqa: E731
    error = float(jnp.max(jnp.abs(ratio(got) - ratio(want))) / jnp.max(jnp.abs(ratio(want))))
    print(f"one_read: first call {first_call:.1f} s, relative error against key_only_attention {error:.2e}", flush=True)
    both = 2 * keys.size * keys.dtype.itemsize
    report = {"shape": [args.batch, args.slots, args.heads, hd], "splits": args.splits, "options": chosen}
    report["relative_error"] = error
    timed = [("one_read", fused)]
    if args.compare:
        timed.append(("two_kernels", jax.jit(functools.partial(key_only_attention, **options))))
    for name, fn in timed:
        seconds = device_seconds(lambda _, fn=fn: fn(q, keys, key_pos, query_pos, length), keys, repeats=7, chained=10)
        report[name] = {"ms": 1e3 * seconds, "key_gb_per_s": both / 2 / seconds / 1e9}
        print(name, json.dumps(report[name]), flush=True)
    if args.compare:
        report["roofline"] = roofline()
        print("roofline", json.dumps(report["roofline"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
