#!/usr/bin/env bash
# Issue 20: the benchmark's slim rows with TriAttention at budget 2,048 (16K generation) now
# that the one-read kernel is the K-only decode step, batch 8 and 139 (session 13's largest),
# to set against session 13's standard rows. Each log line carries the time it was printed;
# at the limit faulthandler prints where Python was (SIGABRT).
#     run: bash results/gpu/issue20/benchmark_job.sh [seconds]
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
limit=${1:-540}
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done; }
date
timeout -s ABRT "$limit" python -X faulthandler -u -m triattention_jax.cli.benchmark --preset llama2-7b \
    --kv_cache slim --slim_value_map float32 --methods triattention --budget 2048 --batch 8,139 \
    --prompt_tokens 1024 --new_tokens 15360 --e2e_tokens 0 --nohf \
    --out "$OUT/h200_llama2_7b_16k_triattention2048_slim_one_read.json" 2>&1 | grep --line-buffered -v Deprecation \
    | stamp > "$OUT/benchmark.log"
echo "rc ${PIPESTATUS[0]}"
tail -60 "$OUT/benchmark.log"
date
