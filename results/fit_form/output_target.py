"""The fit's output target (attention x ||v||, what the form's prior predicts) against its
prior, cheaply: the statistics and band variance of an existing fit file's calibration, the
fit on the four standard-library files `calibrate.py --fit` adds (not its generated text), then
`fitting.choose_scorer` on the same four held-out files as that calibration's choice.

    TRIATTENTION_MODELS=/tmp/store python results/fit_form/output_target.py MODEL FIT_FILE OUT
"""

from __future__ import annotations

import json
import sys
import time

from triattention_jax.calibration import stats_for_model
from triattention_jax.checkpoints.stats import load_fit, save_fit
from triattention_jax.checkpoints.store import load_model
from triattention_jax.eval.texts import fit_documents
from triattention_jax.fitting import choose_scorer, fit_scorer
from triattention_jax.policies.triattention_fit import FEATURES


def main(model: str, fit_file: str, out: str) -> None:
    loaded = load_model(model, dtype="float32")
    stats = stats_for_model(loaded).stats
    q_band_var = load_fit(fit_file, loaded.transformer, FEATURES).q_band_var
    texts = fit_documents(loaded.tokenizer, 4, 4096)
    start = time.perf_counter()
    fitted = fit_scorer(
        loaded.transformer,
        stats,
        q_band_var,
        [tokens for _, tokens in texts],
        target="output",
        documents=[name for name, _ in texts],
    )
    fitted = choose_scorer(
        loaded.transformer, stats, fitted, fit_documents(loaded.tokenizer, 4, 4096, skip=4), budget=512
    )
    save_fit(out, fitted)
    keys = ("documents", "cross_entropy_start", "cross_entropy_fitted", "blend", "aggregation", "redundancy_weight")
    print(json.dumps({k: fitted.metadata[k] for k in keys}, indent=1))
    print(json.dumps(fitted.metadata["selection"]["mean_kl"], indent=1))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
