#!/usr/bin/env bash
# One call of the study on the device machine (run from the checkout there):
#   bash results/study/device.sh          takes the chunk this call carried (.travel/cNN, from
#                                         travel.py pack), rebuilds every model whose chunks are
#                                         all there and prints where each study stands
#   bash results/study/device.sh start MODEL TASKS [GROUPS]   the same, then starts run_study.sh
#                                         for MODEL (smol, q05, q15) in the background (setsid: it
#                                         outlives the call), resuming results/study/MODEL's cells
#   bash results/study/device.sh eval MODEL FOLDER ARGS...   the same, then starts one `evaluate`
#                                         in the background into $root/MODEL/FOLDER (a study's
#                                         cells split over several processes; FIT in ARGS stands
#                                         for the fitted scorer's file, named by FIT_NAME)
#   bash results/study/device.sh choose MODEL TASKS [GROUPS]   the same, then in the background
#                                         chooses the study's fit's mix with R-KV's redundancy on
#                                         this machine's choice documents (results/fit_choice/
#                                         choose.py ... mix_only) into fits/chosen.fit.safetensors
#                                         and runs run_study.sh with only that file's cells
#   bash results/study/device.sh wait S   the same, then waits up to S seconds for the studies
# Every call ends by packing the studies' folders so far into $OUT/study.tgz (the machine may be
# gone before the next call).
set -uo pipefail
source results/study/device_env.sh
[[ -d $root/lib/gguf ]] || python3 -m pip install -q --no-index --no-deps --target $root/lib .travel/whl/*.whl
for d in .travel/c*/; do [[ -d "$d" ]] && mv -f "$d"* $root/chunks/ 2>/dev/null; done
PYTHONPATH=$PWD python3 results/study/travel.py unpack $root/chunks $root/site
declare -A model=([smol]=smollm2-135m-instruct [q05]=qwen2.5-coder-0.5b-instruct [q15]=qwen2.5-coder-1.5b-instruct)
prepare() {
    local s=$1
    [[ -f $root/site/.${model[$s]}.ready ]] || { echo "$s: model not ready"; exit 1; }
    if [[ ! -d $root/repo_$s ]]; then
        mkdir -p $root/repo_$s $root/$s/fits && tar --exclude=./.travel -cf - . | tar -xf - -C $root/repo_$s
        # What earlier runs measured on this Python's texts resumes: cells and statistics.
        if [[ -f results/study/$s/stats.safetensors ]]; then
            # Every task folder: a fresh folder for the same --seed would compute its cells again.
            for d in results/study/$s/*/; do cp -r "$d" $root/$s/; done
            cp results/study/$s/stats.safetensors $root/$s/fits/stats.safetensors
            local name=${FIT_NAME:-output_prior}
            if [[ -f results/study/$s/$name.fit.safetensors ]]; then
                cp results/study/$s/stats.safetensors $root/$s/fits/$name.safetensors
                cp results/study/$s/$name.fit.safetensors $root/$s/fits/
            fi
        fi
    fi
    # `eval` reads the statistics from the model's folder, as run_study.sh leaves them.
    local stats=$TRIATTENTION_MODELS/${model[$s]}/triattention_stats.safetensors
    if [[ ! -f $stats && -f $root/$s/fits/stats.safetensors ]]; then
        (cd $root/repo_$s && python -c "import sys, triattention_jax as t; t.load_model(sys.argv[1], dtype='float32')" \
            "${model[$s]}") && cp $root/$s/fits/stats.safetensors "$stats"
    fi
}
if [[ "${1:-}" == start ]]; then
    s=$2
    prepare $s
    # Each fidelity process holds full attention's log-probs of its 9 texts on the GPU (7 GB for
    # SmolLM2, 22 GB for Qwen): the groups decide how many run at once.
    (cd $root/repo_$s && TASKS="$3" BUDGET_GROUPS="${4:-}" setsid -f bash results/study/run_study.sh \
        "${model[$s]}" $root/$s >> $root/$s.log 2>&1 < /dev/null)
    echo "$s: $3 started"
fi
if [[ "${1:-}" == choose ]]; then
    s=$2
    prepare $s
    (cd $root/repo_$s && setsid -f bash -c 'PYTHONPATH=$PWD:$PYTHONPATH python results/fit_choice/choose.py "$1" "$2/fits/output_prior.fit.safetensors" \
        "$2/fits/chosen.fit.safetensors" 512 mix_only && cp "$2/fits/stats.safetensors" "$2/fits/chosen.safetensors" && TASKS="$3" BUDGET_GROUPS="$4" FIT_NAME=chosen METHODS=none \
        bash results/study/run_study.sh "$1" "$2"' _ "${model[$s]}" $root/$s "$3" "${4:-}" >> $root/$s.log 2>&1 < /dev/null)
    echo "$s: choice, then $3 started"
fi
if [[ "${1:-}" == eval ]]; then
    s=$2 folder=$3
    shift 3
    prepare $s
    args=("${@//FIT/$root/$s/fits/${FIT_NAME:-output_prior}.fit.safetensors}")
    (cd $root/repo_$s && setsid -f python -m triattention_jax.cli.evaluate --model "${model[$s]}" \
        --out $root/$s/$folder "${args[@]}" >> $root/$s/$folder.log 2>&1 < /dev/null)
    echo "$s: $folder started"
fi
status() {
    for s in smol q05 q15; do
        [[ -d $root/$s ]] || continue
        echo "== $s: $(tail -n 1 $root/$s.log 2> /dev/null | tr '\r' '\n' | tail -n 1 | cut -c1-160)"
        for log in $root/$s/*.log; do
            [[ -f $log ]] && echo "   $(basename $log .log): $(tail -c 300 $log | tr '\r' '\n' | grep -v '^\s*$' | tail -n 1 | cut -c1-150)"
        done
    done
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
}
if [[ "${1:-}" == wait ]]; then
    end=$((SECONDS + ${2:-60}))
    while ((SECONDS < end)) && pgrep -f 'run_study.sh|cli.evaluate|choose.py' > /dev/null; do sleep 10; done
fi
status
tar czf "$OUT/study.tgz" -C $root --exclude=./chunks --exclude=./site --exclude='./store*' --exclude=./xla \
        --exclude='./repo_*' --exclude=./bin --exclude=./lib . && ls -la "$OUT"
