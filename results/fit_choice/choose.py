"""What `calibrate.py --fit` now does after fitting (`fitting.choose_scorer`), applied to an
existing fit file: decode the fitting documents at a budget with blends of the fitted weights
and Expected Attention's prior, under each aggregation, then the best of those mixed with R-KV's
redundancy, and keep the lowest mean KL.

    TRIATTENTION_MODELS=/tmp/store python results/fit_choice/choose.py MODEL FIT_FILE OUT [BUDGET] [mix_only]

With `mix_only`, FIT_FILE is a chosen fit whose weights, blend and aggregation stay as they
are, and only the mix with R-KV's redundancy is chosen (the choice gained it in session 24).

The documents are the four that `calibrate.py --fit` chooses on: the standard-library files
after the four fitting ones (`eval.texts.fit_documents(..., skip=4)`, 4,096 tokens each), never
fitting or evaluation texts. The statistics are the model's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

from triattention_jax.calibration import stats_for_model
from triattention_jax.checkpoints.stats import load_fit, save_fit
from triattention_jax.checkpoints.store import load_model
from triattention_jax.eval.texts import fit_documents
from triattention_jax.fitting import choose_scorer, prior_weights
from triattention_jax.policies.triattention_fit import FEATURES


def main(model: str, fit_file: str, out: str, budget: str = "512", mode: str = "") -> None:
    loaded = load_model(model, dtype="float32")
    fitted = load_fit(fit_file, loaded.transformer, FEATURES)
    documents = fit_documents(loaded.tokenizer, 4, 4096, skip=4)
    options = {}
    if mode == "mix_only":
        # The file holds (1 - blend) * prior + blend * the fitted weights, and the choice blends
        # from the fitted weights: recover them, so that the file's own blend gives its weights.
        blend, config = fitted.metadata["blend"], loaded.transformer.config
        if 0 < blend < 1:  # blends 0 and 1 give the prior and the weights exactly as they are
            prior = prior_weights(
                config.num_layers, config.num_heads, config.head_dim, float(loaded.transformer.attention_scaling)
            )
            fitted = dataclasses.replace(fitted, weights=prior + (np.asarray(fitted.weights) - prior) / blend)
        options = {"blends": (blend,), "aggregations": (fitted.metadata["aggregation"],)}
    start = time.perf_counter()
    chosen = choose_scorer(
        loaded.transformer, stats_for_model(loaded).stats, fitted, documents, budget=int(budget), **options
    )
    save_fit(out, chosen)
    print([name for name, _ in documents])
    print(json.dumps({k: chosen.metadata[k] for k in ("blend", "aggregation", "redundancy_weight", "selection")}, indent=1))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
