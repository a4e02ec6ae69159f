#!/usr/bin/env bash
# Issue 20: the one-read kernel on the device (one call, about 3 minutes). Session 17 found two
# warpgroups a block (each its half of the columns and accumulator) faster than one (2.10 ms
# against 2.24 at batch 139), and the exchange of scores the largest cost left (0.8 ms), and
# that 0.11.2 has no remote stores (the cluster probe). This call times the pull with all eight
# remote loads in flight at once, no exchange and no rotation, against the two-kernel step and
# the roofline, with ptxas's register report. Results in $OUT (JSON per run, one log: the
# tool brings back 8 files).
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
run b139_noexchange --batch 139 --slots 2176 --options '{"exchange": false}'
run b139_norotate --batch 139 --slots 2176 --options '{"rotate": false}'
run b8 --batch 8 --slots 2176 --splits 4 --compare
date
