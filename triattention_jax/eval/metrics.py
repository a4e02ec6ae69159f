"""Per-cell metrics of the comparisons with full attention, and the input fingerprint."""

from __future__ import annotations

import numpy as np


def fidelity_metrics(full: np.ndarray, method: np.ndarray, targets: np.ndarray, start: int) -> dict[str, float]:
    """full, method: (T, V) log-probs predicting targets (T,); over positions >= start."""
    full, method, targets = full[start:], method[start:], targets[start:]
    kl = np.sum(np.exp(full) * (full - method), axis=-1)
    rows = np.arange(len(targets))
    return {
        "kl": float(kl.mean()),
        "top1_agreement": float((full.argmax(-1) == method.argmax(-1)).mean()),
        "delta_nll": float((full[rows, targets] - method[rows, targets]).mean()),
        "positions": int(len(targets)),
    }


def divergence_metrics(full: list[int], method: list[int]) -> dict[str, float]:
    agree = [a == b for a, b in zip(full, method)]
    first = agree.index(False) if False in agree else len(agree)
    return {"tokens_to_divergence": first, "agreement": float(np.mean(agree)), "positions": len(agree)}
