#!/usr/bin/env bash
# Issue 20: the one-read kernel on the device (one call, about 3 minutes). Session 17's first
# call found one warpgroup spilling registers (255, the accumulator alone 128 a thread) and two
# blocks a multiprocessor (one TMA stage) 25% faster; this call times two warpgroups a block
# (each its half of the columns and accumulator), with one barrier per tile (double-buffered
# scores), against the two-kernel step and the roofline, with ptxas's
# register report. Results in $OUT (JSON per run, one log: the tool brings back 8 files).
#     run: bash results/gpu/issue20/one_read_job.sh
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
date
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv
MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 python -u results/gpu/issue20/one_read.py > /tmp/ptxas.log 2>&1
grep -i -E "spill|registers|error|one_read" /tmp/ptxas.log | sort | uniq -c | head -20
run() {
    local name=$1
    shift
    echo "$(date +%T) $name"
    timeout 100 python -u results/gpu/issue20/one_read.py "$OUT/$name.json" "$@" > /tmp/run.log 2>&1
    cat /tmp/run.log >> "$OUT/all.log"
    grep -E "^one_read|^two_kernels|^roofline|Error" /tmp/run.log | cut -c1-200 | tail -4
}
run b139 --batch 139 --slots 2176 --compare
run b139_stages1 --batch 139 --slots 2176 --options '{"stages": 1}'
run b139_noexchange --batch 139 --slots 2176 --options '{"exchange": false}'
run b139_norotate --batch 139 --slots 2176 --options '{"rotate": false}'
run b8 --batch 8 --slots 2176 --splits 4 --compare
date
