#!/usr/bin/env bash
# Issue 20: the benchmark's slim rows (Llama-2-7B shape, random bf16 weights, W_KV float32, 16K
# generation) now that the one-read kernel is the K-only decode step. Each log line carries the
# time it was printed; at the limit faulthandler prints where Python was (SIGABRT).
#     run: bash results/gpu/issue20/benchmark_job.sh NAME SECONDS [benchmark flags...]
#   e.g. bash results/gpu/issue20/benchmark_job.sh triattention2048_b139 555 --methods triattention \
#            --budget 2048 --batch 139
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
name=$1 limit=$2
shift 2
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done; }
date
timeout -s ABRT "$limit" python -X faulthandler -u -m triattention_jax.cli.benchmark --preset llama2-7b \
    --kv_cache slim --slim_value_map float32 --prompt_tokens 1024 --new_tokens 15360 --e2e_tokens 0 --nohf \
    --out "$OUT/$name.json" "$@" 2>&1 | grep --line-buffered -v Deprecation | stamp > "$OUT/$name.log"
echo "rc ${PIPESTATUS[0]}"
tail -40 "$OUT/$name.log"
date
