"""Issue 18's calibration-statistics ablation of Expected Attention, as a `triattention_fit`
scorer with set (not fitted) weights: per query head, mu.k/sqrt(d) + k^T Sigma k/(2d) from the
calibration's query mean (the trigonometric feature, RoPE averaged over the future offsets) and
its variance per band (isotropic within a band after RoPE averaging: sigma_f^2/2 per
component, so half the second_moment feature), plus log ||v|| (Expected Attention weighs by the
value norm) and a large weight on the sink indicator (it keeps the first 4 tokens). Not exactly
kvpress's group rule: the fit's scorer sums each head's softmax of score + log ||v|| over the
group, where Expected Attention averages the softmax of the score and then multiplies by ||v||.

    python results/ea_calibration_smollm2/make_scorer.py FIT_FILE OUT
FIT_FILE: any fit of the model (`calibrate.py --fit`), for its q_band_var and metadata.
"""

from __future__ import annotations

import json
import sys

from triattention_jax.checkpoints.stats import FitResult, read_safetensors, read_safetensors_metadata, save_fit
from triattention_jax.fitting import prior_weights
from triattention_jax.policies.triattention_fit import FEATURES


def main(source: str, out: str) -> None:
    tensors = read_safetensors(source)
    metadata = json.loads(read_safetensors_metadata(source)["triattention_fit"])
    if metadata["features"] != list(FEATURES):
        raise SystemExit(f"{source} has features {metadata['features']}, this version uses {list(FEATURES)}")
    weights = prior_weights(*tensors["weights"].shape[:2], metadata["head_dim"])
    metadata.pop("format_version", None)
    metadata.update(target="expected_attention from calibration statistics (set weights, not fitted)")
    metadata.update(cross_entropy_start=None, cross_entropy_fitted=None)
    save_fit(out, FitResult(weights=weights, q_band_var=tensors["q_band_var"], metadata=metadata))


if __name__ == "__main__":
    main(*sys.argv[1:])
