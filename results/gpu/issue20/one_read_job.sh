#!/usr/bin/env bash
# Issue 20: where the one-read kernel's time goes (one device call, about 3 minutes): ptxas's
# register and spill report at a small shape, then batch 139 × 2,176 slots with each part left
# out in turn (wrong results: timings only) and with a third TMA stage. Results in $OUT.
#     run: bash results/gpu/issue20/one_read_job.sh
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
date
MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 python -u results/gpu/issue20/one_read.py "$OUT/small.json" > "$OUT/ptxas.log" 2>&1
grep -i -E "spill|registers|error" "$OUT/ptxas.log" | sort | uniq -c | head -20
for options in '{}' '{"stages": 3}' '{"rotate": false}' '{"exchange": false}' '{"accumulate": false}' \
    '{"rotate": false, "exchange": false, "accumulate": false}'; do
    name=$(echo "$options" | tr -dc 'a-z0-9')
    echo "$(date +%T) $options"
    timeout 60 python -u results/gpu/issue20/one_read.py "$OUT/b139_${name:-default}.json" --batch 139 --slots 2176 \
        --options "$options" > "$OUT/b139_${name:-default}.log" 2>&1
    grep -E "^one_read|Error" "$OUT/b139_${name:-default}.log" | tail -3
done
date
