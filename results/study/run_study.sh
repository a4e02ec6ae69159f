#!/usr/bin/env bash
# The issue-18 study for one model: fits the scorer twice (next-512-query target, and every
# later query), then fidelity (KL against full attention on 4,096-token texts), pass-key
# retrieval and (Qwen models) code completion, each a resumable `evaluate` folder under OUT.
#   bash results/study/run_study.sh MODEL OUT [quick]
# quick: a smoke test of the whole pipeline in minutes on a CPU (tiny calibration, one budget).
# BUDGETS, SAMPLES and TASKS (e.g. TASKS=fidelity) narrow a full run; it resumes where it stopped.
# Tasks run side by side; set XLA_PYTHON_CLIENT_PREALLOCATE=false on a GPU so they share it.
set -euo pipefail
model=$1
out=$2
quick=${3:-}
mkdir -p "$out/fits"
if [[ -n "$quick" ]]; then
    calib=(--num_tokens 2048 --fit_code_files 1 --fit_seq_len 1024)
    budgets=128 samples=1 seq_len=512 needle_len=256 code_len=512 code_budgets=128 code_samples=2
else
    calib=()
    budgets=${BUDGETS:-128,256,512,1024} samples=${SAMPLES:-9} seq_len=4096 needle_len=1024 code_len=4096
    code_budgets=256,512,1024 code_samples=24
fi
tasks=${TASKS:-fidelity needle code}
log() { echo "[$(date +%T)] $*" >&2; }
# The first calibration goes to the model's folder, where every method reads its statistics;
# the second fit's calibration repeats it (compared below) while the tasks already run with the
# first fit, and each task adds the second fit's cells once it is there.
# BUDGET_GROUPS (e.g. "512,128 256,1024" on a GPU) runs fidelity as one process per group.
store="${TRIATTENTION_MODELS:-models}/$model"
rest="$out/fits/rest.fit.safetensors" rest_fit=
methods="triattention,expected_attention,h2o,snapkv,rkv,streaming,random"
if [[ "${FIT:-1}" == 0 ]]; then
    # The baselines only (FIT=0): the model folder's statistics, calibrated here if missing.
    [[ -f "$store/triattention_stats.safetensors" ]] || python calibrate.py --model "$model" "${calib[@]}"
    cp "$store/triattention_stats.safetensors" "$out/fits/stats.safetensors"
    rest=
else
    if [[ ! -f "$out/fits/next512.fit.safetensors" ]]; then
        log "$model: calibration + fit (next 512 queries)"
        python calibrate.py --model "$model" "${calib[@]}" --fit --fit_horizon 512
        cp "$store/triattention_stats.safetensors" "$out/fits/next512.safetensors"
        cp "$store/triattention_fit.safetensors" "$out/fits/next512.fit.safetensors"
    fi
    if [[ ! -f "$rest" ]]; then
        log "$model: calibration + fit (every later query)"
        python calibrate.py --model "$model" "${calib[@]}" --fit --fit_horizon 0 --out "$out/fits/rest.safetensors" \
            > "$out/fit_rest.log" 2>&1 &
        rest_fit=$!
    fi
    methods="triattention_fit:fitted_scorer=$out/fits/next512.fit.safetensors,$methods"
fi
# task NAME ARGS...: evaluate into $out/NAME, then again with the second fit added.
task() {
    local name=$1
    shift
    python -m triattention_jax.cli.evaluate --model "$model" --methods "$methods" --out "$out/$name" "$@"
    while [[ -n "$rest_fit" ]] && kill -0 "$rest_fit" 2> /dev/null; do sleep 5; done
    if [[ -n "$rest" && -f "$rest" ]]; then
        python -m triattention_jax.cli.evaluate --model "$model" --methods "triattention_fit:fitted_scorer=$rest" \
            --out "$out/$name" "$@"
    fi
}
if [[ " $tasks " == *" fidelity "* ]]; then
    for group in ${BUDGET_GROUPS:-$budgets}; do
        task "fidelity_${group//,/_}" --task fidelity --budgets "$group" --num_samples "$samples" \
            --seq_len "$seq_len" > "$out/fidelity_${group//,/_}.log" 2>&1 &
    done
fi
if [[ " $tasks " == *" needle "* ]]; then
    task needle --task needle --budgets "$budgets" --num_samples 6 --seq_len "$needle_len" > "$out/needle.log" 2>&1 &
fi
if [[ " $tasks " == *" code "* && "$model" == qwen* ]]; then
    task code --task code --budgets "$code_budgets" --num_samples "$code_samples" --seq_len "$code_len" \
        > "$out/code.log" 2>&1 &
fi
wait
[[ -z "$rest" ]] || cmp -s "$out/fits/next512.safetensors" "$out/fits/rest.safetensors" || log "warning: the two calibrations differ"
log "$model: done"
