#!/usr/bin/env bash
# The issue-18 study for one model: calibration, then fidelity (KL against full attention on
# 4,096-token texts), pass-key retrieval and (Qwen models) code completion, each a resumable
# `evaluate` folder under OUT, while the fitted scorer is fitted beside them; each task adds the
# fit's cells once it is there.
#   bash results/study/run_study.sh MODEL OUT [quick]
# quick: a smoke test of the whole pipeline in minutes on a CPU (tiny calibration, one budget).
# Environment (a full run resumes where it stopped):
#   BUDGETS, SAMPLES, TASKS (e.g. TASKS=fidelity)  narrow it
#   BUDGET_GROUPS (e.g. "512,128 256,1024")        one fidelity process per group (a GPU)
#   FIT_HORIZON (default 512; 0: every later query) the fit's target; FIT=0 skips the fit
#   FIT_NAME (default output_prior, with _horizonH  names the fit's files (calibrate.py --fit's
#   for another FIT_HORIZON)                        defaults: the output target, from the prior)
#   METHODS=none                                    only the fit's cells (the baselines measured)
#   CODE_BUDGETS, CODE_SAMPLES                      the code task's size
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
    code_budgets=${CODE_BUDGETS:-256,512,1024} code_samples=${CODE_SAMPLES:-24}
fi
tasks=${TASKS:-fidelity needle code}
log() { echo "[$(date +%T)] $*" >&2; }
# Every method reads the statistics in the model's folder; the fit calibrates again (the same
# texts, compared below) while the baselines already run.
store="${TRIATTENTION_MODELS:-models}/$model"
methods=${METHODS:-triattention,expected_attention,h2o,snapkv,rkv,streaming,random}
# A resumed study's OUT/fits/stats.safetensors are the statistics its cells were measured with.
if [[ -f "$out/fits/stats.safetensors" && ! -f "$store/triattention_stats.safetensors" ]]; then
    python -c "import sys, triattention_jax as t; t.load_model(sys.argv[1], dtype='float32')" "$model"
    cp "$out/fits/stats.safetensors" "$store/triattention_stats.safetensors"
elif [[ ! -f "$store/triattention_stats.safetensors" ]]; then
    log "$model: calibration"
    python calibrate.py --model "$model" "${calib[@]}"
fi
cp "$store/triattention_stats.safetensors" "$out/fits/stats.safetensors"
horizon=${FIT_HORIZON:-512}
default_name=output_prior
[[ $horizon == 512 ]] || default_name=output_prior_horizon$horizon
fit="$out/fits/${FIT_NAME:-$default_name}.safetensors" fitting=
if [[ "${FIT:-1}" == 0 ]]; then
    fit=
elif [[ ! -f "${fit%.safetensors}.fit.safetensors" ]]; then
    log "$model: calibration + fit (horizon $horizon) in the background"
    python calibrate.py --model "$model" "${calib[@]}" --fit --fit_horizon "$horizon" --out "$fit" \
        > "$out/fit.log" 2>&1 &
    fitting=$!
fi
# task NAME ARGS...: evaluate the baselines into $out/NAME, then the fit's cells once it is there.
task() {
    local name=$1
    shift
    [[ "$methods" == none ]] || python -m triattention_jax.cli.evaluate --model "$model" --methods "$methods" \
        --out "$out/$name" "$@"
    while [[ -n "$fitting" ]] && kill -0 "$fitting" 2> /dev/null; do sleep 5; done
    if [[ -n "$fit" && -f "${fit%.safetensors}.fit.safetensors" ]]; then
        python -m triattention_jax.cli.evaluate --model "$model" --out "$out/$name" "$@" \
            --methods "triattention_fit:fitted_scorer=${fit%.safetensors}.fit.safetensors"
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
# The tensors, not the bytes: a statistics file's metadata may have gained a note since.
if [[ -n "$fit" ]] && ! python -c "import sys, numpy as np; from safetensors.numpy import load_file as f; \
a, b = f(sys.argv[1]), f(sys.argv[2]); sys.exit(a.keys() != b.keys() or not all(np.array_equal(a[k], b[k]) for k in a))" \
        "$out/fits/stats.safetensors" "$fit"; then
    log "warning: the fit's calibration differs from the statistics the baselines read"
fi
log "$model: done"
