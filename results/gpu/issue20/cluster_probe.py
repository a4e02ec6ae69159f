"""Issue 20: the first brick of a one-read K-only step, a Mosaic GPU kernel in which a cluster of
two thread blocks exchange data through distributed shared memory (each loads its row of x
into its shared memory, waits on a cluster barrier, then reads its peer's row). The one-read
kernel needs exactly this for each block of slots: every block of the cluster scores its own
heads and reads the others' scores from its peers.

On a CPU it only lowers (Mosaic GPU's interpret mode has no cluster axes); on a GPU it runs and
checks the result, printing one line either way.

    PYTHONPATH=. python results/gpu/issue20/cluster_probe.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


swap_rows_doubled = plgpu.kernel(
    _body,
    out_type=jax.ShapeDtypeStruct((2, WIDTH), jnp.float32),
    grid=(1,),
    grid_names=("grid",),
    cluster=(2,),
    cluster_names=("cluster",),
    scratch_types=[
        plgpu.SMEM((WIDTH,), jnp.float32),
        plgpu.SMEM((WIDTH,), jnp.float32),
        plgpu.Barrier(),
        plgpu.ClusterBarrier(collective_axes=("cluster",)),
    ],
)


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (2, WIDTH), jnp.float32)
    if jax.default_backend() != "gpu":
        text = jax.jit(swap_rows_doubled).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        print(f"lowered for CUDA on {jax.default_backend()}: {len(text)} characters, mosaic_gpu={'mosaic_gpu' in text}")
        return
    got = np.asarray(swap_rows_doubled(x))
    expected = 2.0 * np.asarray(x)[::-1]
    print(f"ran on {jax.devices()[0]}: max |error| {np.abs(got - expected).max():.2e}", flush=True)


if __name__ == "__main__":
    main()
