#!/usr/bin/env bash
# Issue 20: where the one-read K-only kernel stops beating the two-kernel step, over batch and
# buffer length (one layer at the Llama-2-7B shape, a full buffer; `one_read.py --compare` per
# shape, each in its own process under a limit). Sets `key_only_one_read.SHORT_BUFFER` and
# `LARGE_BATCH` (`prefers_one_read`). Writes $OUT/crossover.json.
#     run: bash results/gpu/issue20/crossover_job.sh [BATCHES] [SLOTS]
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
batches=${1:-8 40 78}
slots=${2:-4096 8192 16384}
mkdir -p /tmp/crossover
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for b in $batches; do
    for s in $slots; do
        echo "$(date +%T) batch $b slots $s"
        timeout 90 python -u results/gpu/issue20/one_read.py /tmp/crossover/b${b}_s${s}.json --batch $b --slots $s \
            --compare > /tmp/crossover/b${b}_s${s}.log 2>&1
        grep -E "^one_read|^two_kernels|Error" /tmp/crossover/b${b}_s${s}.log | cut -c1-160
    done
done
python - "$OUT/crossover.json" /tmp/crossover/*.json <<'PY'
import json, sys
rows = [json.load(open(p)) for p in sys.argv[2:]]
json.dump(rows, open(sys.argv[1], "w"), indent=1)
for r in rows:
    b, s = r["shape"][:2]
    print(f"batch {b:3d} slots {s:6d}: one read {r['one_read']['ms']:.3f} ms, two kernels {r['two_kernels']['ms']:.3f} ms,"
          f" ratio {r['one_read']['ms'] / r['two_kernels']['ms']:.2f}, roofline {r['roofline']}")
PY
