"""transformers eager and compiled at the tiny preset on the device (checks the compiled path runs)."""

import json
import time

from triattention_jax.bench.hf_reference import hf_step_seconds
from triattention_jax.bench.presets import PRESETS

t = time.time()
r = hf_step_seconds(PRESETS["tiny"], dtype="bfloat16", batch=2, max_cache_len=1024, steps=32)
print(json.dumps({"tiny": r, "wall": time.time() - t}))

import torch  # noqa: E402

x = torch.randn(1 << 31, device="cuda", dtype=torch.bfloat16)  # 4 GiB
y = torch.empty_like(x)
times = []
for i in range(23):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    y.copy_(x)
    b.record()
    torch.cuda.synchronize()
    if i >= 3:
        times.append(a.elapsed_time(b) / 1e3)
times.sort()
print(json.dumps({"torch_copy_4GiB_events_bytes_per_second": 2 * x.numel() * 2 / times[len(times) // 2]}))
