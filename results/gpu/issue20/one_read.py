"""Issue 20: the one-read K-only kernel (`triattention_jax.kernels.key_only_one_read`) timed
against the two-kernel step (`key_only_attention`) on one layer at the Llama-2-7B shape, with
its error against it and the roofline. The kernel's earlier versions and their diagnostics
(what each part costs) are in git history and `one_read_s16/`, `one_read_s17/`.

    PYTHONPATH=. python results/gpu/issue20/one_read.py            # CPU: lowers for CUDA
    PYTHONPATH=. JAX_PLATFORMS=cuda python results/gpu/issue20/one_read.py OUT.json --batch 139 --slots 2176 --compare
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
from scores_sweep import random_layer_inputs  # beside this script

from triattention_jax.kernels.key_only_one_read import key_only_one_read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--splits", type=int, help="of each row's slots (default: the kernel's choice)")
    parser.add_argument("--compare", action="store_true", help="also time key_only_attention and the roofline")
    args = parser.parse_args()
    q, keys, key_pos, query_pos, length = random_layer_inputs(args.batch, args.slots, args.heads, args.head_dim)
    hd = args.head_dim
    options = dict(
        inv_freq=tuple(float(10000.0 ** (-2 * i / hd)) for i in range(hd // 2)), attention_scaling=1.0, scale=hd**-0.5
    )
    fused = jax.jit(functools.partial(key_only_one_read, splits=args.splits, **options))
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
    report = {"shape": [args.batch, args.slots, args.heads, hd], "splits": args.splits}
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
