"""Methods on the documents `calibrate.py --fit` chooses its scorer on, by the choice's own
protocol (`eval.fidelity.FullAttentionReference`, budget 512, no protected prompt), to set the
choice's candidates beside the other methods on the same texts.

    TRIATTENTION_MODELS=/tmp/store python results/fit_choice/compare.py MODEL OUT.json METHOD [METHOD ...]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from triattention_jax.checkpoints.store import load_model
from triattention_jax.eval.fidelity import FullAttentionReference
from triattention_jax.eval.runner import build_eval_policy
from triattention_jax.eval.texts import fit_documents
from triattention_jax.files import write_json_atomic
from triattention_jax.prompts import token_fingerprint

BUDGET, BATCH = 512, 2


def main(model: str, out: str, *methods: str) -> None:
    loaded = load_model(model, dtype="float32")
    documents = fit_documents(loaded.tokenizer, 4, 4096, skip=4)
    tokens = np.asarray([t for _, t in documents], np.int32)
    start = time.perf_counter()
    kl: dict[str, list[float]] = {m: [] for m in methods}
    for first in range(0, len(tokens), BATCH):
        reference = FullAttentionReference.of(loaded.transformer, tokens[first : first + BATCH])
        for method in methods:
            kl[method] += [cell["kl"] for cell in reference.fidelity(build_eval_policy(loaded, method, BUDGET))]
        del reference
    result = {
        "documents": [name for name, _ in documents],
        "fingerprints": [token_fingerprint(row) for row in tokens],
        "budget": BUDGET,
        "kl": kl,
        "mean_kl": {m: float(np.mean(v)) for m, v in kl.items()},
        "seconds": time.perf_counter() - start,
    }
    write_json_atomic(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
