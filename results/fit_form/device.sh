#!/usr/bin/env bash
# The fit in its Expected-Attention-compatible form (session 21) on the device machine, after
# `bash results/study/device.sh` has rebuilt the model's parts from the chunks:
#   bash results/fit_form/device.sh start MODEL   in the background: calibrate.py --fit (the choice
#                                                 included) into the model's folder, then fidelity at
#                                                 BUDGETS (default 512) on NUM_SAMPLES (9) held-out texts
#   bash results/fit_form/device.sh wait S        waits up to S seconds for it
# Every call copies the logs, the fit file and the evaluation so far into $OUT/fit_form.
set -uo pipefail
source results/study/device_env.sh
work=$root/fit_form
mkdir -p $work
if [[ "${1:-}" == start ]]; then
    model=$2
    methods="triattention_fit,triattention,streaming,expected_attention_calibrated:max_offset=65536;aggregation=per_layer_per_head"
    cat > $work/$model.sh <<JOB
set -e
python calibrate.py --model $model --fit
python -m triattention_jax.cli.evaluate --model $model --task fidelity --budgets ${BUDGETS:-512} \
    --num_samples ${NUM_SAMPLES:-9} --methods "$methods" --out $work/$model/heldout
echo done
JOB
    setsid -f bash $work/$model.sh > $work/$model.log 2>&1 < /dev/null
    echo "$model started"
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
for folder in $TRIATTENTION_MODELS/*/; do
    name=$(basename $folder)
    [[ -f $folder/triattention_fit.safetensors ]] && cp $folder/triattention_fit.safetensors $OUT/fit_form/$name.fit.safetensors
    [[ -d $work/$name/heldout ]] && cp -r $work/$name/heldout $OUT/fit_form/$name.heldout
done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
