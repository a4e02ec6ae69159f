"""Issue 20: one K-only layer's two kernels at a real shape, for each score_heads (heads per
scores program), device-synchronised medians; a table on stdout and JSON at argv[1].

    PYTHONPATH=. JAX_PLATFORMS=cuda python results/gpu/issue20/score_heads_sweep.py $OUT/sweep.json \
        --batch 139 --slots 2176 --filled 2176 --heads 32 --head_dim 128 --score_heads 32,16,8,4,2,1
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.kernels.key_only_attention import key_only_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=139)
    parser.add_argument("--slots", type=int, default=2176)
    parser.add_argument("--filled", type=int, default=2176)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--score_heads", default="32,16,8,4,2,1")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    B, S, H, hd = args.batch, args.slots, args.heads, args.head_dim
    keys = jax.random.normal(jax.random.key(0), (B, S, H, hd), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(1), (B, H, hd), jnp.float32)
    key_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    query_pos = jnp.full((B,), S, jnp.int32)
    inv_freq = tuple(float(10000.0 ** (-2 * i / hd)) for i in range(hd // 2))
    rows = []
    reference = None
    for score_heads in (int(h) for h in args.score_heads.split(",")):

        def run(score_heads=score_heads):
            return key_only_attention(
                q,
                keys,
                key_pos,
                query_pos,
                jnp.asarray(args.filled, jnp.int32),
                inv_freq=inv_freq,
                attention_scaling=1.0,
                scale=hd**-0.5,
                score_heads=score_heads,
            )

        out = jax.block_until_ready(run())
        if reference is None:
            reference = out
        error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(out, reference))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        key_bytes = 2 * B * args.filled * H * hd * keys.dtype.itemsize  # each kernel reads the keys once
        rows.append(
            {
                "score_heads": score_heads,
                "ms": 1e3 * seconds,
                "gb_per_s": key_bytes / seconds / 1e9,
                "max_abs_difference": error,
            }
        )
        print(
            f"score_heads {score_heads:3d}: {1e3 * seconds:8.3f} ms, {key_bytes / seconds / 1e9:7.1f} GB/s "
            f"(both reads), max |diff| to the first {error:.2e}",
            flush=True,
        )
    with open(args.out, "w") as f:
        json.dump(
            {"device": str(jax.devices()[0]), "shape": [B, S, H, hd], "filled": args.filled, "rows": rows}, f, indent=1
        )


if __name__ == "__main__":
    main()
