#!/usr/bin/env bash
# Issue 20: the one-read kernel on the device (one call, about 2 minutes). Its first
# diagnosis (session 16: ptxas's spills, each part left out in turn) found the rotation's precise
# sin and cos the largest cost; this call times the hardware's approximate ones after a range
# reduction (fast_math) against the two-kernel step and the roofline, at batch 139 and at
# batch 8 (4 splits), with ptxas's register report. Results in $OUT.
#     run: bash results/gpu/issue20/one_read_job.sh
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
date
MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 python -u results/gpu/issue20/one_read.py "$OUT/small.json" \
    --options '{"fast_math": true}' > "$OUT/ptxas.log" 2>&1
grep -i -E "spill|registers|error" "$OUT/ptxas.log" | sort | uniq -c | head -20
run() {
    local name=$1
    shift
    echo "$(date +%T) $name"
    timeout 90 python -u results/gpu/issue20/one_read.py "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    grep -E "^one_read|^two_kernels|^roofline|Error" "$OUT/$name.log" | cut -c1-200 | tail -4
}
run b139_fast --batch 139 --slots 2176 --options '{"fast_math": true}' --compare
run b8_fast --batch 8 --slots 2176 --splits 4 --options '{"fast_math": true}' --compare
run b139_fast_noexchange --batch 139 --slots 2176 --options '{"fast_math": true, "exchange": false}'
date
