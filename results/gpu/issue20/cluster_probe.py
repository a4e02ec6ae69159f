"""Issue 20: the first brick of a one-read K-only step, a Mosaic GPU kernel in which a cluster of
two thread blocks exchange data through distributed shared memory (each loads its row of x
into its shared memory, waits on a cluster barrier, then reads its peer's row). The one-read
kernel needs exactly this for each block of slots: every block of the cluster scores its own
heads and reads the others' scores from its peers.

The push variant stores into the peer's shared memory instead (a remote store does not wait
for an answer; a remote load does), at a row of the peer's buffer chosen statically or by the
block's index: 0.11.2 failed to lower a peer reference at a dynamic offset for loads.

On a CPU it only lowers (Mosaic GPU's interpret mode has no cluster axes); on a GPU it runs and
checks the result, printing one line each.

    PYTHONPATH=. python results/gpu/issue20/cluster_probe.py
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WIDTH = 128


def _body(x_gmem, o_gmem, mine, out_smem, loaded, cluster_barrier):
    block = jax.lax.axis_index("cluster")
    plgpu.copy_gmem_to_smem(x_gmem.at[block], mine, loaded)
    plgpu.barrier_wait(loaded)
    # Every block's row is in its shared memory before any block reads its peer's.
    plgpu.barrier_arrive(cluster_barrier)
    plgpu.barrier_wait(cluster_barrier)
    out_smem[...] = plgpu.cluster_ref(mine, {"cluster": 1 - block})[...] * 2.0
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, o_gmem.at[block])
    plgpu.wait_smem_to_gmem(0)


def _two_block_kernel(body, received_shape: tuple[int, ...]):
    """A cluster of two blocks, each with its row of x and a buffer for what it receives."""
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((2, WIDTH), jnp.float32),
        grid=(1,),
        grid_names=("grid",),
        cluster=(2,),
        cluster_names=("cluster",),
        scratch_types=[
            plgpu.SMEM((WIDTH,), jnp.float32),
            plgpu.SMEM(received_shape, jnp.float32),
            plgpu.Barrier(),
            plgpu.ClusterBarrier(collective_axes=("cluster",)),
        ],
    )


swap_rows_doubled = _two_block_kernel(_body, (WIDTH,))


def _push_body(x_gmem, o_gmem, mine, inbox, loaded, cluster_barrier, *, dynamic):
    block = jax.lax.axis_index("cluster")
    plgpu.copy_gmem_to_smem(x_gmem.at[block], mine, loaded)
    plgpu.barrier_wait(loaded)
    row = block if dynamic else 1
    doubled = plgpu.load(mine, (), layout=plgpu.Layout.WG_STRIDED((WIDTH,), 1)) * 2.0
    plgpu.cluster_ref(inbox, {"cluster": 1 - block})[row] = doubled
    plgpu.commit_smem()
    # Every block has pushed its row before any block copies out what it received.
    plgpu.barrier_arrive(cluster_barrier)
    plgpu.barrier_wait(cluster_barrier)
    plgpu.copy_smem_to_gmem(inbox.at[pl.ds(1 - block if dynamic else 1, 1)], o_gmem.at[pl.ds(block, 1)])
    plgpu.wait_smem_to_gmem(0)


def push_rows_doubled(dynamic: bool):
    return _two_block_kernel(functools.partial(_push_body, dynamic=dynamic), (2, WIDTH))


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (2, WIDTH), jnp.float32)
    expected = 2.0 * np.asarray(x)[::-1]
    variants = {"pull": swap_rows_doubled, "push static row": push_rows_doubled(False)}
    variants["push dynamic row"] = push_rows_doubled(True)
    for name, kernel in variants.items():
        try:
            if jax.default_backend() != "gpu":
                text = jax.jit(kernel).trace(x).lower(lowering_platforms=("cuda",)).as_text()
                print(f"{name}: lowered for CUDA on {jax.default_backend()}: {len(text)} characters", flush=True)
                continue
            got = np.asarray(kernel(x))
            print(f"{name}: ran on {jax.devices()[0]}: max |error| {np.abs(got - expected).max():.2e}", flush=True)
        except Exception as error:  # a probe: report each variant's failure and go on
            print(f"{name}: {type(error).__name__}: {str(error)[:300]}", flush=True)


if __name__ == "__main__":
    main()
