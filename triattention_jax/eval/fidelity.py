"""Teacher-forced fidelity to full attention: full attention's log-probs of a batch of texts,
computed once and kept on the device, against which any policy's rounds are compared there, so
only per-position metrics reach the host (one 4,096-token Qwen text is 2.5 GB of log-probs)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.config import DEFAULT_DIVIDE_LENGTH
from triattention_jax.decoding import prompt_bucket, teacher_forced_pieces
from triattention_jax.eval.metrics import fidelity_metrics, position_metrics
from triattention_jax.eval.texts import PREFILL_TOKENS
from triattention_jax.model import Transformer
from triattention_jax.policies import EvictionPolicy, KVPolicy


def first_eviction_position(policy: KVPolicy, prefill_length: int, total: int, divide_length: int) -> int:
    """The position from which on the method may have evicted something (total if never)."""
    if not isinstance(policy, EvictionPolicy):
        return total
    bucket = prompt_bucket(prefill_length)
    if bucket > policy.budget:
        return prefill_length
    new_tokens = total - prefill_length
    compacting = policy.compacting_rounds(prefill_length, bucket, new_tokens, divide_length)
    steps = policy.round_steps(prefill_length, bucket, new_tokens, divide_length)
    return prefill_length + sum(steps[: compacting[0]]) if compacting else total


@jax.jit
def _compare_piece(
    reference: jax.Array, next_tokens: jax.Array, rows: jax.Array, begin: jax.Array, logprobs: jax.Array
) -> jax.Array:
    """`position_metrics` of a method's piece (batch, width, V) of log-probs starting at `begin`
    against the same positions of rows `rows` of full attention's `reference` (samples, T, V);
    next_tokens: (samples, T)."""
    width = logprobs.shape[1]
    full = jax.lax.dynamic_slice_in_dim(reference, begin, width, axis=1)[rows]
    return position_metrics(full, logprobs, jax.lax.dynamic_slice_in_dim(next_tokens, begin, width, axis=1)[rows])


@functools.partial(jax.jit, donate_argnums=0)
def _write_piece(reference: jax.Array, logprobs: jax.Array, begin: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(reference, logprobs, begin, axis=1)


@dataclasses.dataclass(frozen=True)
class FullAttentionReference:
    """Full attention's teacher-forced log-probs of `tokens` (texts, T), on the device.

    Build with `FullAttentionReference.of(transformer, tokens)`; `fidelity(policy, rows)` runs a
    policy over some of the texts and returns their `fidelity_metrics`."""

    transformer: Transformer
    tokens: np.ndarray
    logprobs: jax.Array  # (texts, T, vocab)
    next_tokens: jax.Array  # (texts, T), the last position's a placeholder

    @classmethod
    def of(cls, transformer: Transformer, tokens: np.ndarray) -> FullAttentionReference:
        tokens = np.asarray(tokens, np.int32)
        # Written piece by piece into one donated buffer: concatenating the pieces would hold
        # them twice (44 GB for 9 Qwen texts).
        reference = None
        for begin, logprobs, _ in teacher_forced_pieces(transformer, tokens, prefill_length=PREFILL_TOKENS):
            if reference is None:
                reference = jnp.zeros((*tokens.shape, logprobs.shape[-1]), logprobs.dtype)
            reference = _write_piece(reference, logprobs, begin)
        next_tokens = jnp.asarray(np.pad(tokens[:, 1:], ((0, 0), (0, 1))))
        return cls(transformer=transformer, tokens=tokens, logprobs=reference, next_tokens=next_tokens)

    def fidelity(self, policy: KVPolicy, rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """`fidelity_metrics` of `policy` on texts `rows` (default all), over the positions from
        its first possible eviction on; the last position predicts nothing and is left out."""
        rows = np.arange(len(self.tokens)) if rows is None else np.asarray(rows)
        total = self.tokens.shape[1]
        start = first_eviction_position(policy, PREFILL_TOKENS, total - 1, DEFAULT_DIVIDE_LENGTH)
        pieces = teacher_forced_pieces(
            self.transformer, self.tokens[rows], prefill_length=PREFILL_TOKENS, policy=policy
        )
        per_position = np.concatenate(
            [
                np.asarray(_compare_piece(self.logprobs, self.next_tokens, rows, begin, logprobs))
                for begin, logprobs, _ in pieces
            ],
            axis=1,
        )
        return [fidelity_metrics(row[:-1], start) for row in per_position]
