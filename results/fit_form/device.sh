#!/usr/bin/env bash
# The fit in its Expected-Attention-compatible form (session 21) on the device machine, after
# `bash results/study/device.sh` has rebuilt the model's parts from the chunks:
#   bash results/fit_form/device.sh start MODEL   in the background: calibrate.py --fit (the choice
#                                                 included; FIT_TARGET, default output; FIT_START,
#                                                 default prior) into a model store of its own (so
#                                                 variants can run side by side),
#                                                 then fidelity of METHODS (default the fit against
#                                                 its rivals) at BUDGETS (default 512) on
#                                                 NUM_SAMPLES (9) held-out texts
#   bash results/fit_form/device.sh wait S        waits up to S seconds for every started job
# Every call copies the logs, the fit files and the evaluations so far into $OUT/fit_form.
set -uo pipefail
source results/study/device_env.sh
work=$root/fit_form
mkdir -p $work
if [[ "${1:-}" == start ]]; then
    model=$2
    variant=${FIT_TARGET:-output}_${FIT_START:-prior}
    methods=${METHODS:-"triattention_fit,triattention,streaming,expected_attention_calibrated:max_offset=65536;aggregation=per_layer_per_head"}
    # Each variant converts the model into its own store: no statistics or fit shared.
    store=$root/store_$variant
    cat > $work/$model.$variant.sh <<JOB
set -e
export TRIATTENTION_MODELS=$store
python calibrate.py --model $model --fit --fit_target ${FIT_TARGET:-output} --fit_start ${FIT_START:-prior}
python -m triattention_jax.cli.evaluate --model $model --task fidelity --budgets ${BUDGETS:-512} \
    --num_samples ${NUM_SAMPLES:-9} --methods "$methods" --out $work/$model.$variant
echo done
JOB
    setsid -f bash $work/$model.$variant.sh > $work/$model.$variant.log 2>&1 < /dev/null
    echo "$model $variant started"
fi
if [[ "${1:-}" == wait ]]; then
    end=$((SECONDS + ${2:-60}))
    while ((SECONDS < end)) && pgrep -f 'calibrate.py|cli.evaluate' > /dev/null; do sleep 10; done
fi
for log in $work/*.log; do
    [[ -f $log ]] && echo "== $(basename $log): $(tail -c 400 $log | tr '\r' '\n' | grep -v '^\s*$' | tail -n 2 | cut -c1-200)"
done
mkdir -p $OUT/fit_form
cp $work/*.log $OUT/fit_form/ 2> /dev/null
for fit in $root/store*/*/triattention_fit.safetensors; do
    [[ -f $fit ]] && cp $fit $OUT/fit_form/$(basename $(dirname $(dirname $fit))).$(basename $(dirname $fit)).fit.safetensors
done
for heldout in $work/*/; do
    [[ -d $heldout ]] && cp -r $heldout $OUT/fit_form/
done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
