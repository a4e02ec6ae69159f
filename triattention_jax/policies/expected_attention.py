"""Expected Attention (Devoto, Jeblick, Jégou 2025, arXiv 2510.00636; kvpress's
`ExpectedAttentionPress`; SPEC 6): keys ranked by the attention that future queries are
expected to pay them, with the queries modelled as a Gaussian.

With μ, Σ the mean and covariance of the pre-RoPE queries of a head, and R̄ the RoPE rotation
averaged over the next `n_future_positions` positions, E[exp(q·k/√d)] for q ~ N(R̄μ, R̄ΣR̄ᵀ)
is exp(μ̄·k/√d + kᵀΣ̄k/(2d)); the score of a key is that, as a softmax over the keys, averaged
over the query heads of its GQA group, times ‖v‖ (ranked by its log). The first `n_sink`
positions are always kept. `expected_attention_calibrated` takes μ and Σ from calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.cache import EMPTY_POSITION, CacheLayer, KVCache, layer_by_layer
from triattention_jax.errors import UserError
from triattention_jax.policies.base import (
    EvictionPolicy,
    RoundContext,
    array_field,
    check_aggregation,
    check_slim_selection,
    last_prompt_entries,
    policy_dataclass,
    register,
    slide_window,
    with_sinks_kept,
)
from triattention_jax.rope import apply_rope, rope_cos_sin
from triattention_jax.scoring import aggregate

if TYPE_CHECKING:
    from triattention_jax.model import Transformer
    from triattention_jax.scoring import FrequencyStats


@policy_dataclass
class ExpectedAttention(EvictionPolicy):
    """Build with `ExpectedAttention.create(transformer, budget=...)` (it needs the model's RoPE).

    The query statistics come from the sequence's own recent queries, as kvpress takes them
    from the sequence being compressed: the last `query_window` pre-RoPE queries are carried in
    `cache.state`, updated every step, and positions below `n_sink` never enter the statistics
    (kvpress drops the first n_sink hidden states as outliers).

    window: recent tokens protected besides the sinks. kvpress protects nothing but the sinks,
    so 0; the score itself covers recent keys (the queries it models are the ones that follow).
    query_window: 128, one compaction interval at the default divide_length: kvpress's decoding
    wrapper (`DecodingPress`) scores with the hidden states buffered since its last compression
    (at most 256), so the statistics follow the recent text rather than the whole past. They
    are memory: query_window·heads against 2·slots·kv_heads entries of K and V, about 12% of a
    2,176-slot Qwen3-8B cache at 128 (stored in the cache's dtype, the dtype the model computed
    them in, so without loss).
    use_covariance / use_value_norm: switch off the kᵀΣ̄k term / the ‖v‖ factor (kvpress's
    use_covariance / use_vnorm). kvpress's epsilon (added before the ‖v‖ factor) is 0 by default
    and is left out.
    aggregation: the token sets, as TriAttention's (`scoring.aggregate`); kvpress keeps one per
    (layer, KV head), so per_layer_per_head.
    prior_count, prior_mean, prior_variance: a calibration as a prior (`with_prior`): its
    pre-RoPE query mean (layers, heads, head_dim) and per-component variance (layers, heads,
    head_dim), pooled with the window as prior_count pseudo-queries, so μ = (n·μ_w + n₀·μ₀) /
    (n + n₀) and Σ is the covariance of that mixture. A window of 128 queries is few for a
    head_dim × head_dim covariance; the calibration alone misses what this text asks.
    """

    observes: ClassVar[frozenset[str]] = frozenset({"queries"})

    inv_freq: jax.Array = array_field()
    budget: int = 2048
    protect_prompt: bool = False
    window: int = 0
    attention_scaling: float = 1.0
    n_future_positions: int = 512
    n_sink: int = 4
    query_window: int = 128
    use_covariance: bool = True
    use_value_norm: bool = True
    aggregation: str = "per_layer_per_head"
    prior_count: int = 0
    prior_mean: jax.Array | None = array_field(default=None)
    prior_variance: jax.Array | None = array_field(default=None)

    @classmethod
    def create(cls, transformer: Transformer, **options: Any) -> ExpectedAttention:
        """The policy with `transformer`'s RoPE frequencies and magnitude factor (as its
        attention applies them: scaled RoPE types included)."""
        return cls(
            inv_freq=jnp.asarray(np.asarray(transformer.inv_freq[...]), jnp.float32),
            attention_scaling=float(transformer.attention_scaling),
            **options,
        )

    def with_prior(self, q_mean: np.ndarray, q_band_var: np.ndarray, count: int) -> ExpectedAttention:
        """This policy with a calibration's query statistics as a prior worth `count` queries:
        q_mean (layers, heads, head_dim) laid out as RoPE splits a head, q_band_var (layers,
        heads, head_dim/2) each band's E|q_f − E q_f|², isotropic within the band (σ²_f/2 per
        component), as `expected_attention_calibrated` reads them."""
        component_variance = np.concatenate([np.asarray(q_band_var) / 2] * 2, axis=-1)
        return dataclasses.replace(
            self,
            prior_count=count,
            prior_mean=jnp.asarray(q_mean, jnp.float32),
            prior_variance=jnp.asarray(component_variance, jnp.float32),
        )

    def check(
        self,
        prompt_lengths: Sequence[int],
        divide_length: int,
        *,
        slim: bool = False,
        context_length: int | None = None,
    ) -> None:
        check_expected_attention(self, "expected_attention", slim, query_window=self.query_window)
        check_aggregation(self.aggregation)
        check_slim_selection(self.aggregation, slim)
        if self.prior_count < 0 or (self.prior_count > 0) != (self.prior_mean is not None):
            raise UserError(
                f"expected_attention's prior_count={self.prior_count} needs a calibration's statistics when above 0 "
                "and cannot be negative: pass prior_count=N with statistics (--stats FILE), or leave it out"
            )
        super().check(prompt_lengths, divide_length, slim=slim, context_length=context_length)

    def start(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        return _with_state(cache, *last_prompt_entries(out.queries, positions, self.query_window, cache.dtype))

    def observe(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        window = (cache.state["recent_queries"], cache.state["recent_positions"])
        return _with_state(cache, *slide_window(*window, out.queries, positions, self.query_window))

    def query_statistics(
        self, queries: jax.Array, query_positions: jax.Array, prior: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """μ (batch, heads, head_dim) and Σ (batch, heads, head_dim, head_dim) of one layer's
        window of pre-RoPE queries (batch, window, heads, head_dim), float32, over the entries
        at positions ≥ n_sink; Σ divides by the count (kvpress's biased estimate). prior: the
        layer's (mean, per-component variance), each (heads, head_dim), pooled as prior_count
        queries."""
        used = (query_positions >= self.n_sink)[:, :, None, None]
        count = jnp.sum(used, axis=1).astype(jnp.float32)  # (batch, 1, 1)
        queries = jnp.where(used, queries.astype(jnp.float32), 0.0)
        weight = 0.0 if prior is None else float(self.prior_count)
        prior_mean = 0.0 if prior is None else prior[0]
        mean = (jnp.sum(queries, axis=1) + weight * prior_mean) / jnp.maximum(count + weight, 1)
        centered = jnp.where(used, queries - mean[:, None], 0.0)
        scatter = jnp.einsum("bwhd,bwhe->bhde", centered, centered)
        if prior is not None:
            shift = prior_mean - mean
            scatter += weight * (jnp.einsum("bhd,bhe->bhde", shift, shift) + jax.vmap(jnp.diag)(prior[1]))
        return mean, scatter / jnp.maximum(count + weight, 1)[..., None]

    def layer_scores(
        self,
        layer: CacheLayer,
        queries: jax.Array,
        query_positions: jax.Array,
        rotation: tuple[jax.Array, jax.Array],
        prior: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """One layer's scores (batch, kv_heads, slots), as `expected_log_scores`."""
        keys = layer.rope_keys.astype(jnp.float32)  # (B, K, S, hd), post-RoPE
        B, K, S, hd = keys.shape
        H = queries.shape[2]
        mean, covariance = self.query_statistics(queries, query_positions, prior)
        cos, sin = rotation
        # μ̄ = R̄μ, Σ̄ = R̄ΣR̄ᵀ. apply_rope maps each vector along the last axis to R̄x, so on Σ it
        # gives ΣR̄ᵀ, and on that product's transpose, R̄Σ (Σ is symmetric), it gives R̄ΣR̄ᵀ.
        mean = apply_rope(mean, cos[:, None], sin[:, None]).reshape(B, K, H // K, hd)
        logits = jnp.einsum("bkgd,bksd->bkgs", mean, keys) * hd**-0.5
        if self.use_covariance:
            covariance = apply_rope(covariance, cos[:, None, None], sin[:, None, None])
            covariance = apply_rope(jnp.swapaxes(covariance, -1, -2), cos[:, None, None], sin[:, None, None])
            covariance = covariance.reshape(B, K, H // K, hd, hd)
            logits += jnp.einsum("bksd,bkgde,bkse->bkgs", keys, covariance, keys) / (2 * hd)
        return expected_log_scores(layer, logits, self.n_sink, self.use_value_norm)

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        rotation = future_rotation(
            context.position, self.inv_freq, self.attention_scaling, range(self.n_future_positions)
        )
        positions = cache.state["recent_positions"]
        layers = [cache.layers(), list(cache.state["recent_queries"])]
        if self.prior_count:
            layers += [list(self.prior_mean), list(self.prior_variance)]

        def one_layer(layer: CacheLayer, queries: jax.Array, *prior: jax.Array) -> jax.Array:
            return self.layer_scores(layer, queries, positions, rotation, tuple(prior) or None)

        # One layer's float32 keys and (keys × Σ̄) product at a time are the scoring's scratch.
        scores = jnp.stack(layer_by_layer(one_layer, *layers))
        return aggregate(scores, cache.stacked("pos") != EMPTY_POSITION, self.aggregation)


def future_rotation(
    position: jax.Array, inv_freq: jax.Array, attention_scaling: float, offsets: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """R̄ for each row: the mean over positions p = position + δ, δ in `offsets` (kvpress: 0 …
    n_future_positions − 1), of the RoPE rotation at p (with the model's magnitude factor), as
    the (cos, sin) pair that `apply_rope` takes: R̄x = apply_rope(x, cos, sin). position:
    (batch,); each (batch, head_dim/2)."""
    future = position[:, None] + jnp.asarray(offsets, jnp.int32)[None]
    cos, sin = rope_cos_sin(future, inv_freq, attention_scaling)
    # The mean of rotations is linear in (cos, sin): band f of R̄ is the 2×2 block of
    # mean cos and mean sin (no longer a rotation: its magnitude shrinks for fast bands).
    return jnp.mean(cos, axis=1), jnp.mean(sin, axis=1)


def expected_log_scores(layer: CacheLayer, logits: jax.Array, n_sink: int, use_value_norm: bool) -> jax.Array:
    """log of a key's expected attention, averaged over its GQA group, times ‖v‖ (batch,
    kv_heads, slots): sinks +inf, empty slots −inf. logits: (batch, kv_heads, group, slots), the
    expected q·k/√d + kᵀΣ̄k/(2d) of each query head.

    The softmax runs over the cached keys that are not sinks, as kvpress's does (it cuts the
    sinks off before scoring). Log space, so that a score averaged over layers (`aggregate`)
    weighs every layer alike and no weight underflows to a tie.
    """
    scored = (layer.pos >= n_sink)[:, :, None, :]
    log_weights = jax.nn.log_softmax(jnp.where(scored, logits, -jnp.inf), axis=-1)
    group = logits.shape[2]
    scores = jax.nn.logsumexp(jnp.where(scored, log_weights, -jnp.inf), axis=2) - jnp.log(group)
    if use_value_norm:
        if layer.v is None:
            raise ValueError("expected attention's value norm needs V: a K-only layer holds none (see check)")
        scores = scores + jnp.log(jnp.linalg.norm(layer.v.astype(jnp.float32), axis=-1))
    return with_sinks_kept(scores, layer.pos, n_sink)


def calibrated_moments(
    transformer: Transformer, stats: FrequencyStats, q_band_var: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A calibration's pre-RoPE query mean (layers, heads, head_dim), its complex band means
    laid out as RoPE splits a head (real parts, then imaginary parts), and its band variance
    (layers, heads, head_dim/2), both checked against `transformer`'s shape."""
    config = transformer.config
    expected = (config.num_layers, config.num_heads, config.head_dim // 2)
    for name, array in (
        ("q_mean_real", stats.q_mean_real),
        ("q_mean_imag", stats.q_mean_imag),
        ("q_band_var", q_band_var),
    ):
        if tuple(np.shape(array)) != expected:
            raise UserError(
                f"calibration {name} has shape {tuple(np.shape(array))}, the model needs {expected}: recalibrate"
            )
    q_mean = np.concatenate([np.asarray(stats.q_mean_real), np.asarray(stats.q_mean_imag)], axis=-1)
    return q_mean, np.asarray(q_band_var)


def check_expected_attention(policy: Any, method: str, slim: bool, **positive: int) -> None:
    """The settings both Expected Attention policies refuse: a value norm without V (a K-only
    cache), fewer than one future position, negative sinks, and any of `positive` below 1."""
    if slim and policy.use_value_norm:
        raise UserError(
            f"{method} weighs keys by ‖v‖, which a K-only (--kv_cache slim) cache does not hold: use the standard cache"
        )
    counts = {"n_future_positions": policy.n_future_positions, **positive}
    if min(counts.values()) < 1 or policy.n_sink < 0:
        required = " and ".join(f"{name} >= 1" for name in counts)
        got = ", ".join(f"{name}={value}" for name, value in {**counts, "n_sink": policy.n_sink}.items())
        raise UserError(f"{method} needs {required} and n_sink >= 0, got {got}")


# The recent queries' logical axes, for sharding them with the cache.
STATE_AXES = {
    "recent_queries": ("layers", "batch", "window", "q_heads", "head_dim"),
    "recent_positions": ("batch", "window"),
}


def _with_state(cache: KVCache, queries: jax.Array, query_positions: jax.Array) -> KVCache:
    return cache.with_state(
        {"recent_queries": queries, "recent_positions": query_positions.astype(jnp.int32)}, STATE_AXES
    )


register("expected_attention", ExpectedAttention)
