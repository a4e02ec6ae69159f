"""Per-cell metrics of the comparisons with full attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

POSITION_METRICS = ("kl", "top1_agreement", "delta_nll")


@jax.jit
def position_metrics(full: jax.Array, method: jax.Array, next_tokens: jax.Array) -> jax.Array:
    """Per position (batch, T, POSITION_METRICS): KL(full ‖ method), whether the two agree on
    the most likely token, and the method's extra negative log-likelihood of the actual next
    token. full, method: (batch, T, V) log-probs; next_tokens: (batch, T). On the device, so
    the vocabulary axis never reaches the host."""
    kl = jnp.sum(jnp.exp(full) * (full - method), axis=-1)
    agree = (jnp.argmax(full, axis=-1) == jnp.argmax(method, axis=-1)).astype(jnp.float32)

    def picked(logprobs: jax.Array) -> jax.Array:
        return jnp.take_along_axis(logprobs, next_tokens[..., None], axis=-1)[..., 0]

    return jnp.stack([kl, agree, picked(full) - picked(method)], axis=-1)


def fidelity_metrics(per_position: np.ndarray, start: int) -> dict[str, float]:
    """per_position: (T, POSITION_METRICS) from `position_metrics`; means over positions >= start."""
    kept = np.asarray(per_position, np.float64)[start:]
    return {name: float(kept[:, i].mean()) for i, name in enumerate(POSITION_METRICS)} | {"positions": len(kept)}


def divergence_metrics(full: list[int], method: list[int]) -> dict[str, float]:
    agree = [a == b for a, b in zip(full, method)]
    first = agree.index(False) if False in agree else len(agree)
    return {"tokens_to_divergence": first, "agreement": float(np.mean(agree)), "positions": len(agree)}
