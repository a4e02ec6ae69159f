"""Issue 20: one K-only layer's two kernels (`key_only_attention`) at a real shape, for each
tuning option of the scores kernel, every option in its own process with a time limit (a
Triton compile that runs away costs one row, not the call). A row per option on stdout as it
finishes, JSON rewritten after each at argv[1]; the roofline (`bench.speed.roofline`) last.

    PYTHONPATH=. JAX_PLATFORMS=cuda python results/gpu/issue20/scores_sweep.py $OUT/sweep_b139.json --batch 139
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OPTIONS = (
    {},
    {"unroll_heads": 2},
    {"unroll_heads": 4},
    {"unroll_heads": 8},
    {"unroll_heads": 4, "num_warps": 8},
    {"score_heads": 8},
    {"score_heads": 8, "unroll_heads": 8},
    {"score_heads": 4},
    {"score_heads": 4, "unroll_heads": 4},
    {"score_heads": 2, "unroll_heads": 2},
    {"score_heads": 1},
    {"unroll_heads": 32},
)


def random_layer_inputs(batch: int, slots: int, heads: int, head_dim: int):
    import jax
    import jax.numpy as jnp

    keys = jax.random.normal(jax.random.key(0), (batch, slots, heads, head_dim), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(1), (batch, heads, head_dim), jnp.float32)
    key_pos = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
    return q, keys, key_pos, jnp.full((batch,), slots, jnp.int32), jnp.asarray(slots, jnp.int32)


def run_one(args: argparse.Namespace, options: dict) -> dict:
    """Both kernels with `options`, device-synchronised; the largest difference of the sums
    from the default options' (0 for the default itself)."""
    import jax.numpy as jnp

    from triattention_jax.bench.speed import device_seconds
    from triattention_jax.kernels.key_only_attention import key_only_attention

    q, keys, key_pos, query_pos, length = random_layer_inputs(args.batch, args.slots, args.heads, args.head_dim)
    hd = args.head_dim
    inv_freq = tuple(float(10000.0 ** (-2 * i / hd)) for i in range(hd // 2))

    def call(**chosen):
        return key_only_attention(
            q, keys, key_pos, query_pos, length, inv_freq=inv_freq, attention_scaling=1.0, scale=hd**-0.5, **chosen
        )

    compile_start = time.perf_counter()
    out = call(**options)
    out[0].block_until_ready()
    compile_seconds = time.perf_counter() - compile_start
    reference = call()
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(out, reference))
    seconds = device_seconds(lambda _: call(**options), keys, repeats=7, chained=10)
    both_reads = 2 * keys.size * keys.dtype.itemsize
    return {
        "ms": 1e3 * seconds,
        "gb_per_s": both_reads / seconds / 1e9,
        "first_call_s": compile_seconds,
        "max_abs_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=139)
    parser.add_argument("--slots", type=int, default=2176)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds per option, compile included.")
    parser.add_argument("--one", help="Run these options (JSON) here and print the row as JSON.")
    args = parser.parse_args()
    if args.one is not None:
        if args.one == "roofline":
            from triattention_jax.bench.speed import roofline

            result = roofline()
        else:
            result = run_one(args, json.loads(args.one))
        print(json.dumps(result), flush=True)
        return
    shape = [args.batch, args.slots, args.heads, args.head_dim]
    report = {"shape": shape, "rows": []}
    common = [f"--batch={args.batch}", f"--slots={args.slots}", f"--heads={args.heads}", f"--head_dim={args.head_dim}"]
    for options in (*OPTIONS, "roofline"):
        one = options if options == "roofline" else json.dumps(options)
        print(f"{time.strftime('%H:%M:%S')} {one} ...", flush=True)
        try:
            done = subprocess.run(
                [sys.executable, __file__, args.out, *common, "--one", one],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            if done.returncode:
                errors = [line for line in done.stderr.splitlines() if "Error" in line] or ["no output"]
                row = {"error": errors[-1][:300]}
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row = {"error": f"over {args.timeout:.0f} s"}
        if options == "roofline":
            report["roofline"] = row
        else:
            report["rows"].append({"options": options, **row})
        print(f"{time.strftime('%H:%M:%S')} {one}: {json.dumps(row)}", flush=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
