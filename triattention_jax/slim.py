"""Slim attention (SPEC 7): a K-only KV cache for MHA checkpoints.

With as many KV heads as query heads and h·d_k = d, W_K (d×d) is square, so a token's normed
input is h = (k − b_k)·W_K^{-1} and its value is V = (k − b_k)·W_KV + b_v with
W_KV = W_K^{-1}·W_V. The cache then stores K only (half the bytes of K and V), before RoPE;
decoding computes (Σ_s p_s·k_s)·W_KV per head and rotates the keys inside the score
reduction (`model.key_only_block`). Prefill is unchanged.

The reconstruction amplifies the rounding of the cached K by up to cond(W_K), so each layer's
condition number is computed (float64); a layer above `max_cond` falls back to a standard K+V
cache (the model is refused only when no layer qualifies). W_KV is read at every decode step, so
it is kept in the model's dtype in each layer where rounding it adds no more error to the
recovered values than a standard cache's rounding of V does (measured per layer against
float64 on the model's own keys), else in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import SLIM_AXES, Transformer

KV_CACHE_MODES = ("standard", "slim")
# auto: per layer, the model's dtype where the measured error allows, else float32.
VALUE_MAP_DTYPES = ("auto", "float32", "model")
# Probe tokens when the caller has none: the errors are relative, so any text of the
# vocabulary's tokens exercises every layer's keys.
_PROBE_LENGTH = 64


def default_max_cond(dtype: str) -> float:
    """1/u for the cache dtype (u: unit roundoff, 2^-24 float32, 2^-8 bfloat16).

    Recovering V from a K rounded to the cache dtype has a relative error of up to about
    cond(W_K)·u (to first order), so above 1/u that bound no longer limits the error at all.
    """
    return 2.0 / float(jnp.finfo(jnp.dtype(dtype)).eps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueRounding:
    """One layer's recovered values against float64, on probe keys k (the model's own):
    cache_rounding, the relative (Frobenius) error of V rounded to the cache dtype, which is
    what a standard cache stores; value_map_rounding, the relative error that rounding W_KV to
    the model's dtype adds to (k − b_k)·W_KV + b_v."""

    cache_rounding: float
    value_map_rounding: float

    @property
    def model_dtype_allowed(self) -> bool:
        return self.value_map_rounding <= self.cache_rounding


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlimReport:
    """What the conversion measured: cond(W_K) per layer (2-norm, float64; None when no
    threshold applies), the threshold, and the layers that keep a standard K+V cache."""

    cond: tuple[float | None, ...]
    max_cond: float
    dtype: str
    fallback_layers: tuple[int, ...] = ()
    value_map_dtypes: tuple[str | None, ...] = ()
    value_errors: tuple[ValueRounding | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        measured = [c for c in self.cond if c is not None]
        return {
            "cond_wk": list(self.cond),
            "max_cond_wk": max(measured, default=None),
            "threshold": self.max_cond,
            "dtype": self.dtype,
            "fallback_layers": list(self.fallback_layers),
            "value_map_dtypes": list(self.value_map_dtypes),
            "value_errors": [None if e is None else dataclasses.asdict(e) for e in self.value_errors],
        }


def check_applicable(config: ModelConfig) -> None:
    """Raises `UserError` saying why a model cannot have a K-only cache."""
    if config.qk_norm:
        raise UserError(
            "--kv_cache slim cannot invert a K normalized per head (Qwen3's k_norm is nonlinear): "
            "use --kv_cache standard"
        )
    hidden_kv = config.num_kv_heads * config.head_dim
    if config.num_kv_heads != config.num_heads or hidden_kv != config.hidden_size:
        raise UserError(
            f"--kv_cache slim needs multi-head attention with a square W_K (num_kv_heads·head_dim = hidden_size): this "
            f"model has {config.num_heads} query / {config.num_kv_heads} KV heads of {config.head_dim} "
            f"({hidden_kv} ≠ {config.hidden_size}), so V cannot be recovered from K; use --kv_cache standard"
        )


def value_map_of(wk: np.ndarray, wv: np.ndarray, *, condition: bool = True) -> tuple[np.ndarray, float | None]:
    """W_KV = W_K^{-1}·W_V by a float64 solve (no explicit inverse) and cond(W_K) (None
    unless `condition`: an SVD, minutes for a 7B model's 32 layers).

    wk, wv: (D, K, hd) as stored. Returns W_KV (D, K, hd) float64: rows index all heads' K.
    """
    D = wk.shape[0]
    wk64 = np.asarray(wk, np.float64).reshape(D, -1)
    wv64 = np.asarray(wv, np.float64).reshape(D, -1)
    cond = float(np.linalg.cond(wk64)) if condition else None
    try:
        return np.linalg.solve(wk64, wv64).reshape(wv.shape), cond
    except np.linalg.LinAlgError:
        return np.full(wv.shape, np.nan), float("inf")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _probe_keys(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Pre-RoPE keys (layers, batch, T, K, hd) of a prefill; the weights are arguments (a
    closure would make them constants of the compiled program: 32 s for two layers of
    Llama-2-7B's width on a CPU)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    first = jnp.zeros(tokens.shape[:1], jnp.int32)
    model = nnx.merge(graphdef, state)
    return model.extend(None, tokens, positions, logits_at=first, collect_pre_rope=True).keys


def value_rounding(
    transformer: Transformer, maps: dict[int, np.ndarray], probe_tokens: np.ndarray
) -> dict[int, ValueRounding]:
    """Per layer of `maps` (index -> W_KV (D, K, hd) float64): `ValueRounding` measured on the
    pre-RoPE keys the model computes for probe_tokens (batch, T), in float64."""

    tokens = jnp.asarray(np.atleast_2d(probe_tokens), jnp.int32)
    graphdef, state = nnx.split(transformer)
    keys = np.asarray(_probe_keys(graphdef, state, tokens), np.float64)  # (L, B, T, K, hd)
    dtype = transformer.dtype

    def rounded(x: np.ndarray) -> np.ndarray:
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)

    out = {}
    for index, w_kv in maps.items():
        weights = transformer.layers[index].arrays()
        k = keys[index].reshape(-1, w_kv.shape[0])
        if "bk" in weights:
            k = k - np.asarray(weights["bk"], np.float64).reshape(-1)
        w = w_kv.reshape(w_kv.shape[0], -1)
        v = k @ w
        if "bv" in weights:
            v = v + np.asarray(weights["bv"], np.float64).reshape(-1)
        norm = np.linalg.norm(v)
        out[index] = ValueRounding(
            cache_rounding=float(np.linalg.norm(rounded(v) - v) / norm),
            value_map_rounding=float(np.linalg.norm(k @ (rounded(w) - w)) / norm),
        )
    return out


def slim_transformer(
    transformer: Transformer,
    *,
    max_cond: float | None = None,
    value_map: str = "auto",
    probe_tokens: np.ndarray | None = None,
) -> tuple[Transformer, SlimReport]:
    """A copy of the model (sharing its weights) whose caches hold K only, with W_KV per layer.

    Refuses (`UserError`) models it cannot apply to. A layer whose cond(W_K) exceeds `max_cond`
    (default: `default_max_cond` of the model's dtype; inf skips the SVDs) keeps a standard
    K+V cache; when no layer qualifies the mode is refused. value_map: W_KV's dtype, "float32",
    "model" (the model's dtype), or "auto": per layer the model's dtype where
    `ValueRounding.model_dtype_allowed`, measured on probe_tokens (batch, T) (default: 64
    seeded random tokens), else float32. On the tiny random configs a bfloat16 W_KV everywhere
    raised the KL to float32 from 1.2e-3 to 1.6e-3 and 1.7e-4 to 1.7e-3 (see WORKSPACE).
    """
    check_applicable(transformer.config)
    if value_map not in VALUE_MAP_DTYPES:
        raise UserError(f"unknown W_KV dtype {value_map!r}: choose one of {', '.join(VALUE_MAP_DTYPES)}")
    dtype = transformer.dtype.name
    threshold = default_max_cond(dtype) if max_cond is None else float(max_cond)
    maps, conds = zip(
        *(
            value_map_of(np.asarray(layer.wk[...]), np.asarray(layer.wv[...]), condition=threshold < float("inf"))
            for layer in transformer.layers
        )
    )
    fallback = tuple(index for index, cond in enumerate(conds) if cond is not None and not cond <= threshold)
    if len(fallback) == len(conds):
        raise UserError(
            f"--kv_cache slim refused: cond(W_K) exceeds {threshold:.3g} in every layer (smallest "
            f"{min(conds):.3g}), so recovering V from the {dtype} K cache would amplify its rounding; "
            "use --kv_cache standard or raise --slim_max_cond"
        )
    kept = {index: w_kv for index, w_kv in enumerate(maps) if index not in fallback}
    errors: dict[int, ValueRounding] = {}
    if value_map == "auto" and dtype != "float32":
        if probe_tokens is None:
            rng = np.random.default_rng(0)
            probe_tokens = rng.integers(0, transformer.config.vocab_size, size=(1, _PROBE_LENGTH))
        errors = value_rounding(transformer, kept, probe_tokens)
    map_dtypes: dict[int, str] = {}
    for index in kept:
        low = value_map == "model" or (index in errors and errors[index].model_dtype_allowed)
        map_dtypes[index] = dtype if low else "float32"
    slim = nnx.merge(*nnx.split(transformer))
    for index, w_kv in kept.items():
        slim.layers[index].w_kv = nnx.Param(
            jnp.asarray(w_kv.transpose(1, 0, 2), map_dtypes[index]), logical_axes=SLIM_AXES
        )
    layers = range(len(conds))
    return slim, SlimReport(
        cond=tuple(conds),
        max_cond=threshold,
        dtype=dtype,
        fallback_layers=fallback,
        value_map_dtypes=tuple(map_dtypes.get(i) for i in layers),
        value_errors=tuple(errors.get(i) for i in layers),
    )


def logprob_error(
    standard: Transformer, slim: Transformer, tokens: np.ndarray, *, prefill_length: int, divide_length: int = 32
) -> dict[str, float]:
    """Measured difference of the decode path's next-token log-probabilities, slim against
    standard cache (same weights and dtype), over the teacher-forced positions after
    `prefill_length`: max absolute, and relative to the largest |log-prob|."""
    from triattention_jax.decoding import teacher_force

    a = teacher_force(standard, tokens, prefill_length=prefill_length, divide_length=divide_length)[:, prefill_length:]
    b = teacher_force(slim, tokens, prefill_length=prefill_length, divide_length=divide_length)[:, prefill_length:]
    error = float(np.abs(a - b).max())
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    return {
        "max_abs": error,
        "relative": error / float(np.abs(a).max()),
        "top1_agreement": float((top_a == top_b).mean()),
    }
