#!/usr/bin/env bash
# Issue 20: the one-read kernel, now the library's K-only decode step on Hopper
# (`kernels/key_only_one_read.py`), on the device in one call (about 8 minutes):
#   1. the kernel tests compiled on the H200 (the one-read test runs only there);
#   2. one layer at the Llama-2-7B shape against the two-kernel step and the roofline;
#   3. the benchmark's slim rows with TriAttention at budget 2,048 (16K generation), batch 8
#      and 139 (session 13's largest), to set against session 13's standard rows.
# Results in $OUT (the tool brings back 8 files).
#     run: bash results/gpu/issue20/one_read_job.sh
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
date
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_key_only_attention.py tests/test_decode_attention.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
for batch in 139 8; do
    echo "$(date +%T) layer batch $batch"
    timeout 60 python -u results/gpu/issue20/one_read.py "$OUT/layer_b$batch.json" --batch $batch --slots 2176 \
        --compare > /tmp/layer.log 2>&1
    grep -E "^one_read|^two_kernels|^roofline|Error" /tmp/layer.log | cut -c1-160
done
echo "$(date +%T) benchmark"
timeout 300 python -m triattention_jax.cli.benchmark --preset llama2-7b --kv_cache slim --slim_value_map float32 \
    --methods triattention --budget 2048 --batch 8,139 --prompt_tokens 1024 --new_tokens 15360 --e2e_tokens 0 \
    --nohf --out "$OUT/h200_llama2_7b_16k_triattention2048_slim_one_read.json" > "$OUT/benchmark.log" 2>&1
echo "rc $?"
tail -25 "$OUT/benchmark.log"
date
