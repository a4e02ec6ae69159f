"""Issue 19 probe (device): roofline variants, decode-attention kernel correctness and timing at
fill levels of one static buffer, JAX's shipped gqa decode kernel, the XLA path."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.bench import speed
from triattention_jax.kernels import decode_attention as da
from triattention_jax.model import _attention, stored_block

OUT = os.environ.get("OUT", "/tmp")
results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def timed(fn, *args, repeats=9, chained=10):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(chained):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / chained)
    return float(np.median(times))


def save():
    with open(f"{OUT}/probe.json", "w") as f:
        json.dump(results, f, indent=1)


# Roofline
results["roofline"] = speed.roofline()
print("roofline", results["roofline"], flush=True)
x = jax.jit(lambda: jax.lax.broadcasted_iota(jnp.int32, (1 << 33 >> 1,), 0).astype(jnp.bfloat16))()
results["roofline_variants"] = {
    "copy_8GiB": 2 * x.nbytes / timed(jax.jit(jnp.copy), x),
    "full_sum_8GiB": x.nbytes / timed(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x),
    "row_sum_8GiB": x.nbytes / timed(jax.jit(lambda a: jnp.sum(a.reshape(-1, 1 << 16), axis=1, dtype=jnp.float32)), x),
    "add_one_8GiB": 2 * x.nbytes / timed(jax.jit(lambda a: a + jnp.asarray(1, a.dtype)), x),
}
del x
print("variants", results["roofline_variants"], flush=True)
save()
roof = results["roofline"]["roofline_bytes_per_second"]


# Correctness on the GPU against a float32 reference
def reference(q, k, v, pos, qpos, length, scale):
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    s = jnp.einsum("bkgd,bksd->bkgs", q, k, precision="highest") * scale
    S = k.shape[2]
    vis = (jnp.arange(S) < length)[None, None, None] & ((pos >= 0) & (pos <= qpos[:, None, None]))[:, :, None]
    s = jnp.where(vis, s, -1e30)
    m = s.max(-1)
    w = jnp.where(vis, jnp.exp(s - m[..., None]), 0)
    return jnp.einsum("bkgs,bksd->bkgd", w, v, precision="highest") / w.sum(-1)[..., None]


rng = np.random.default_rng(0)
errors = []
try:
    for dtype in (jnp.bfloat16, jnp.float32):
        for B, K, G, S, hd, length, splits, block in [
            (3, 8, 4, 2176, 128, 2176, None, None),
            (3, 8, 4, 2176, 128, 1000, None, None),
            (3, 8, 4, 2176, 128, 77, 5, 32),
            (2, 2, 2, 1600, 64, 1111, None, None),
            (2, 4, 8, 17408, 128, 9000, 3, 64),
            (1, 8, 4, 17408, 128, 17408, None, None),
        ]:
            q = jnp.asarray(rng.standard_normal((B, K, G, hd)), dtype)
            k = jnp.asarray(rng.standard_normal((B, K, S, hd)), dtype)
            v = jnp.asarray(rng.standard_normal((B, K, S, hd)), dtype)
            pos = np.tile(np.arange(S, dtype=np.int32), (B, K, 1))
            pos[0, :, 5:50] = -1
            pos[:, 1, rng.integers(0, S, 100)] = -1
            qpos = jnp.asarray(rng.integers(length // 2, length + 5, B), jnp.int32)
            acc, m, total = da.decode_attention(
                q, k, v, jnp.asarray(pos), qpos, jnp.asarray(length), scale=hd**-0.5, splits=splits, block=block
            )
            out = acc / total[..., None]
            ref = reference(q, k, v, jnp.asarray(pos), qpos, length, hd**-0.5)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            errors.append(
                {
                    "dtype": str(jnp.dtype(dtype)),
                    "shape": [B, K, G, S, hd],
                    "length": length,
                    "rel_err": err,
                    "finite": bool(jnp.isfinite(out).all()),
                }
            )
            print(errors[-1], flush=True)
except Exception as e:  # noqa: BLE001
    errors.append({"error": repr(e)[:2000]})
    print(errors[-1], flush=True)
results["correctness"] = errors
save()


# Timing: Qwen3-8B layer shape, full attention's static buffer at its largest batch
def layer_arrays(B, S, K=8, G=4, hd=128):
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (B, K, G, hd), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, K, S, hd), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, K, S, hd), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, K, S))
    return q, k, v, pos


def kv_bytes(B, fill, K=8, hd=128):
    return B * K * fill * (2 * hd * 2 + 4)


timing = []


def attempt(what, fn, args, B, S, fill):
    try:
        t = timed(fn, *args)
        timing.append(
            {"what": what, "B": B, "S": S, "fill": fill, "ms": 1e3 * t, "roofline": kv_bytes(B, fill) / t / roof}
        )
    except Exception as e:  # noqa: BLE001
        timing.append({"what": what, "B": B, "S": S, "fill": fill, "error": repr(e)[:1500]})
    print(timing[-1], flush=True)


from jax.experimental.pallas.ops.gpu import decode_attention as shipped  # noqa: E402

for B, S, fills in [(43, 17408, (1088, 4352, 8704, 17408)), (331, 2176, (2176,))]:
    q, k, v, pos = layer_arrays(B, S)
    qpos = jnp.full((B,), S, jnp.int32)
    scale = 128**-0.5
    xla = jax.jit(
        lambda q, k, v, pos, qpos, B=B, scale=scale: _attention(
            q.reshape(B, 1, 32, 128), qpos[:, None], [(stored_block(k, v), pos)], scale
        )[0]
    )
    attempt("xla (whole buffer)", xla, (q, k, v, pos, qpos), B, S, S)
    kern = jax.jit(lambda q, k, v, pos, qpos, n, scale=scale: da.decode_attention(q, k, v, pos, qpos, n, scale=scale))
    for fill in fills:
        attempt("ours", kern, (q, k, v, pos, qpos, jnp.asarray(fill, jnp.int32)), B, S, fill)
    if B == 43:
        for block, warps, stages, splits in [
            (64, 4, 2, 1),
            (64, 4, 2, 2),
            (64, 4, 2, 8),
            (32, 4, 2, None),
            (128, 4, 2, None),
            (64, 8, 2, None),
            (64, 4, 3, None),
            (64, 4, 4, None),
            (128, 8, 3, None),
            (32, 2, 3, None),
        ]:
            f = jax.jit(
                lambda q, k, v, pos, qpos, n, block=block, warps=warps, stages=stages, splits=splits, scale=scale: (
                    da.decode_attention(
                        q,
                        k,
                        v,
                        pos,
                        qpos,
                        n,
                        scale=scale,
                        block=block,
                        num_warps=warps,
                        num_stages=stages,
                        splits=splits,
                    )
                )
            )
            attempt(
                f"ours block={block} warps={warps} stages={stages} splits={splits}",
                f,
                (q, k, v, pos, qpos, jnp.asarray(S, jnp.int32)),
                B,
                S,
                S,
            )
        g = jax.jit(
            lambda q, k, v, n, B=B: shipped.gqa(
                q.reshape(B, 32, 128), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), kv_seq_len=n, block_k=64
            )
        )
        for fill in fills:
            attempt("jax gqa (shipped, kv_seq_len)", g, (q, k, v, jnp.full((B,), fill, jnp.int32)), B, S, fill)
    del q, k, v, pos
    results["timing"] = timing
    save()
print(json.dumps(results["roofline"], indent=1))
for row in timing:
    print({key: (round(val, 4) if isinstance(val, float) else val) for key, val in row.items()})
