#!/usr/bin/env bash
# One call of the study on the device machine (run from the checkout there):
#   bash results/study/device.sh          takes the chunk this call carried (.travel/cNN, from
#                                         travel.py pack), rebuilds every model whose chunks are
#                                         all there, starts its study once in the background
#                                         (setsid: it outlives the call) and prints where each stands
#   bash results/study/device.sh wait S   the same, then waits up to S seconds for the studies
# Every call ends by packing the studies' folders so far into $OUT/study.tgz (the machine may be
# gone before the next call).
set -uo pipefail
root=/tmp/s
mkdir -p $root/chunks $root/bin $root/lib $root/site
# A wrapper, not a link: a link to a virtualenv's python3 starts it outside the virtualenv.
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > $root/bin/python && chmod +x $root/bin/python
export PATH=$root/bin:$PATH PYTHONPATH=$root/site:$root/lib TRIATTENTION_MODELS=$root/store \
    TRIATTENTION_COMPILATION_CACHE=$root/xla XLA_PYTHON_CLIENT_PREALLOCATE=false \
    JAX_DEFAULT_MATMUL_PRECISION=highest PYTHONUNBUFFERED=1
[[ -d $root/lib/gguf ]] || python3 -m pip install -q --no-index --no-deps --target $root/lib .travel/whl/*.whl
for d in .travel/c*/; do [[ -d "$d" ]] && mv -f "$d"* $root/chunks/ 2>/dev/null; done
PYTHONPATH=$PWD python3 results/study/travel.py unpack $root/chunks $root/site
declare -A short=([smollm2-135m-instruct]=smol [qwen2.5-coder-0.5b-instruct]=q05 [qwen2.5-coder-1.5b-instruct]=q15)
# Fidelity processes per model: each holds full attention's log-probs of all its texts on the GPU
# (9 x 4,096 x vocabulary floats: 7 GB for SmolLM2, 22 GB for Qwen), so all of them fit at once.
declare -A groups=([smol]="512,128,256,1024" [q05]="512,128 256,1024" [q15]="512,256 1024,128")
for model in "${!short[@]}"; do
    s=${short[$model]}
    if [[ -f $root/site/.$model.ready && ! -d $root/repo_$s ]]; then
        mkdir -p $root/repo_$s && tar --exclude=./.travel -cf - . | tar -xf - -C $root/repo_$s
        (cd $root/repo_$s && BUDGET_GROUPS="${groups[$s]}" setsid -f bash results/study/run_study.sh "$model" $root/$s \
            > $root/$s.log 2>&1 < /dev/null)
        echo "$model: study started"
    fi
done
status() {
    for s in smol q05 q15; do
        [[ -f $root/$s.log ]] || continue
        echo "== $s: $(tail -n 1 $root/$s.log | tr '\r' '\n' | tail -n 1 | cut -c1-160)"
        for log in $root/$s/*.log; do
            [[ -f $log ]] && echo "   $(basename $log .log): $(tail -c 300 $log | tr '\r' '\n' | grep -v '^\s*$' | tail -n 1 | cut -c1-150)"
        done
    done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
}
if [[ "${1:-}" == wait ]]; then
    end=$((SECONDS + ${2:-60}))
    while ((SECONDS < end)) && pgrep -f run_study.sh > /dev/null; do sleep 10; done
fi
status
tar czf "$OUT/study.tgz" -C $root --exclude=./chunks --exclude=./site --exclude=./store --exclude=./xla \
        --exclude='./repo_*' --exclude=./bin --exclude=./lib . && ls -la "$OUT"
