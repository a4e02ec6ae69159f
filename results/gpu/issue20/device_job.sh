#!/usr/bin/env bash
# Issue 20's next device call, in one go (about 6 minutes): the cluster probe, then the scores
# sweep at the largest batch and at batch 8 of the TriAttention-2,048 buffer (2,176 slots).
# Every line reaches the call's output as it is printed; results land in $OUT.
#     run: bash results/gpu/issue20/device_job.sh
set -uo pipefail
export PYTHONPATH=. JAX_PLATFORMS=cuda
date
timeout 120 python -u results/gpu/issue20/cluster_probe.py
for batch in 139 8; do
    timeout 270 python -u results/gpu/issue20/scores_sweep.py "$OUT/sweep_b$batch.json" --batch "$batch" --timeout 60
done
date
