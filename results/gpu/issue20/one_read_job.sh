#!/usr/bin/env bash
# Issue 20: the one-read kernel on the device (one call, about 3 minutes). Session 16 found the
# exchange's two cluster barriers per tile cost 0.65 ms at batch 139 and one warpgroup per
# multiprocessor overlapped nothing; this call times one barrier per tile (double-buffered
# scores), and one TMA stage (so that two blocks fit a multiprocessor's shared memory), each
# against the two-kernel step and the roofline, with ptxas's register report. Results in $OUT.
#     run: bash results/gpu/issue20/one_read_job.sh
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
date
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv
MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 python -u results/gpu/issue20/one_read.py "$OUT/small.json" \
    --options '{"fast_math": true}' > "$OUT/ptxas.log" 2>&1
grep -i -E "spill|registers|error" "$OUT/ptxas.log" | sort | uniq -c | head -20
run() {
    local name=$1
    shift
    echo "$(date +%T) $name"
    timeout 100 python -u results/gpu/issue20/one_read.py "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    grep -E "^one_read|^two_kernels|^roofline|Error" "$OUT/$name.log" | cut -c1-200 | tail -4
}
run b139 --batch 139 --slots 2176 --options '{"fast_math": true}' --compare
run b139_stages1 --batch 139 --slots 2176 --options '{"fast_math": true, "stages": 1}'
run b139_noexchange --batch 139 --slots 2176 --options '{"fast_math": true, "exchange": false}'
run b139_norotate --batch 139 --slots 2176 --options '{"fast_math": true, "rotate": false}'
run b139_noaccumulate --batch 139 --slots 2176 --options '{"fast_math": true, "accumulate": false}'
run b8 --batch 8 --slots 2176 --splits 4 --options '{"fast_math": true}' --compare
date
