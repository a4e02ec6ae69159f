"""Does a one-shot measure on fitting texts say which token-set aggregation a fitted scorer
should use? For each aggregation, the share of the next 512 queries' attention that the
`budget` keys the scorer keeps at once would hold, averaged over (layer, KV head) and over the
snapshots past `budget` tokens of fitting documents (never evaluation texts):
`python results/selection_shares/measure.py MODEL FIT_FILE BUDGET OUT_JSON [DOCUMENTS]`."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.calibration import stats_for_model
from triattention_jax.checkpoints.stats import load_fit
from triattention_jax.checkpoints.store import load_model
from triattention_jax.eval.texts import fit_documents
from triattention_jax.fitting import sequence_examples
from triattention_jax.policies.triattention_fit import FEATURES, group_log_attention
from triattention_jax.prompts import token_fingerprint
from triattention_jax.scoring import AGGREGATIONS, aggregate

HORIZON = 512
SNAPSHOT_EVERY = 256


@functools.partial(jax.jit, static_argnames=("budget",))
def kept_shares(weights: jax.Array, features: jax.Array, targets: jax.Array, mask: jax.Array, *, budget: int):
    """(len(AGGREGATIONS), N) shares of the target held by each aggregation's kept keys.
    weights: (layers, heads, F); features: (layers, N, heads, T, F); targets: (layers, N,
    kv_heads, T); mask: (N, T)."""
    K = targets.shape[2]
    valid = jnp.broadcast_to(mask[None, :, None, :], targets.shape)
    scores = jax.vmap(lambda x, w, v: group_log_attention(jnp.einsum("nhsf,hf->nhs", x, w), v, K))(
        features, weights, valid
    )
    shares = []
    for mode in AGGREGATIONS:
        kept = jax.lax.top_k(aggregate(scores, valid, mode), budget)[1]
        shares.append(jnp.mean(jnp.sum(jnp.take_along_axis(targets, kept, axis=-1), axis=-1), axis=(0, 2)))
    return jnp.stack(shares)


def main(model_name: str, fit_path: str, budget: int, out: str, documents: int = 4) -> None:
    model = load_model(model_name)
    fit = load_fit(fit_path, model.transformer, FEATURES)
    docs = fit_documents(model.tokenizer, documents, 4096)
    start = time.time()
    totals, count = np.zeros(len(AGGREGATIONS)), 0
    examples = sequence_examples(
        model.transformer,
        stats_for_model(model).stats,
        fit.q_band_var,
        [tokens for _, tokens in docs],
        horizon=HORIZON,
        snapshot_every=SNAPSHOT_EVERY,
        target="attention",
        budget=budget,
        after=budget,
    )
    for layers in examples:
        features, targets, masks = (jnp.stack(parts) for parts in zip(*layers))
        shares = kept_shares(jnp.asarray(fit.weights), features, targets, masks[0], budget=budget)
        totals += np.asarray(jnp.sum(shares, axis=1))
        count += shares.shape[1]
    record = {
        "model": model_name,
        "fit": fit_path,
        "budget": budget,
        "documents": [name for name, _ in docs],
        "fingerprints": [token_fingerprint(tokens) for _, tokens in docs],
        "snapshots": count,
        "shares": {mode: float(total / count) for mode, total in zip(AGGREGATIONS, totals)},
        "seconds": round(time.time() - start, 1),
    }
    Path(out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], *(int(a) for a in sys.argv[5:]))
