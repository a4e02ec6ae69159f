"""Issue 19 diagnosis (device): where TriAttention's step at its largest batch goes.

1. A full-attention round on TriAttention's buffer shape (batch 330, 2176 slots) at fills 64,
   1088 and 2048: the intercept is the step without attention reads (weights, GEMMs at batch
   330, norms, logits), the slope the cost per filled slot.
2. A profiler trace of one TriAttention round (compaction included), as a perfetto JSON."""

import dataclasses
import glob
import json
import os
import shutil

import jax

from triattention_jax.bench import speed
from triattention_jax.bench.presets import random_stats, random_transformer
from triattention_jax.decoding import decode_round
from triattention_jax.methods import PolicySettings, build_policy
from triattention_jax.policies import FullAttention

OUT = os.environ["OUT"]
B = 330
transformer = random_transformer("qwen3-8b", "bfloat16")
rows = []
for step in speed.measure_steps(
    transformer, FullAttention(), "full", batch=B, slots=2176, fills=[64, 1088, 2048], divide_length=128
):
    rows.append({"fill": step.filled, "ms": 1e3 * step.step_seconds, "gb": step.bytes_per_step / 1e9})
    print(rows[-1], flush=True)
json.dump(rows, open(f"{OUT}/diag_full_on_2176.json", "w"), indent=1)

policy = build_policy(transformer, "triattention", PolicySettings(budget=2048), stats=random_stats(transformer))
setup = speed.steady_round(transformer, policy, batch=B, slots=2176, filled=2176)
cache = setup.cache
for index in range(3):
    args, options = setup.round_arguments(cache, 128)
    if index == 2:
        jax.profiler.start_trace("/tmp/trace", create_perfetto_trace=True)
    cache, _, emitted = decode_round(*args, **options)
    jax.block_until_ready(emitted)
    cache = dataclasses.replace(cache, cursor=jax.numpy.asarray(2176, jax.numpy.int32))  # full again: compacts
jax.profiler.stop_trace()
for path in glob.glob("/tmp/trace/**/*.json.gz", recursive=True):
    shutil.copy(path, f"{OUT}/triattention_round_trace.json.gz")
    print(path, os.path.getsize(path))
