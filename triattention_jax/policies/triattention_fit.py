"""A fitted TriAttention: the paper's score terms and a few more, combined per (layer, head)
with weights fitted offline (`fitting.fit_scorer`) so that the score predicts the attention
future queries pay each key. Query-free at decode time, like the paper's scorer: everything
is computed from the cached keys, values and positions when the buffer is compacted.

Per query head h and cached key s at the current position t0, the features are

    trigonometric  Σ_f Re(A_f · conj(k'_f))              the paper's series (mean over offsets)
    norm           Σ_f (qa_f − |qm_f|)·|k'_f|            the paper's norm term
    second_moment  Σ_f ρ_f·σ²_f·|k'_f|² / (2·head_dim)  E[exp(q·k)]'s second-order term, σ²_f the
                                                          query variance of band f (isotropic within
                                                          a band), ρ_f = |mean over offsets of the
                                                          band's rotation|², how much of it survives
                                                          the averaging
    log_value_norm log ‖v_s‖                              the key's share of the output scales with it
    log_age        log(1 + t0 − pos_s)                    recency

Head h's predicted attention is the softmax of w_h · (the features but log_value_norm) over
the cached keys that are not sinks, and its predicted share of the output that times
‖v_s‖^w_h,value; a KV head ranks its keys by the log of that share summed over its GQA group
(the quantity the weights are fitted to), averaged over layers by default like the paper's
scorer, or as the fit file says. The first SINK_POSITIONS positions are always kept. Written
so, Expected Attention with calibrated statistics is one setting of the weights
(`fitting.prior_weights`): a sink inside each head's softmax, or ‖v‖ inside it, would
renormalise every head by what it pays the sinks, and would weigh the group's heads unlike
Expected Attention's mean of softmaxes (measured: 69% of the same tokens kept, WORKSPACE).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.cache import EMPTY_POSITION, CacheLayer, KVCache, layer_by_layer
from triattention_jax.errors import UserError
from triattention_jax.model import MASK_VALUE
from triattention_jax.policies.base import (
    SIMILARITY_THRESHOLD,
    EvictionPolicy,
    RoundContext,
    array_field,
    check_aggregation,
    key_redundancy,
    policy_dataclass,
    register,
    sink_keys,
    with_sinks_kept,
)
from triattention_jax.policies.triattention import scoring_fields
from triattention_jax.rope import band_power
from triattention_jax.scoring import (
    DEFAULT_OFFSETS,
    FrequencyStats,
    aggregate,
    key_score_terms,
)

FEATURES = ("trigonometric", "norm", "second_moment", "log_value_norm", "log_age")
VALUE_FEATURE = FEATURES.index("log_value_norm")
SINK_POSITIONS = 4


def key_features(
    keys: jax.Array,
    values: jax.Array,
    key_positions: jax.Array,
    position: jax.Array,
    stats: FrequencyStats,
    q_band_var: jax.Array,
    inv_freq: jax.Array,
    phasors: jax.Array,
    attention_scaling: float = 1.0,
) -> jax.Array:
    """FEATURES of one layer's keys for each of its query heads, float32 (batch, heads, slots, features).

    keys, values: (batch, kv_heads, slots, head_dim), keys post-RoPE as cached; key_positions:
    (batch, kv_heads, slots); position: (batch,) t0; stats: the layer's statistics, each
    (1, heads, head_dim/2); q_band_var: (heads, head_dim/2) the query variance per band;
    phasors: `scoring.offset_phasors` of the offsets scored over.
    """
    B, K, S, hd = keys.shape
    H = q_band_var.shape[0]
    trig, norm = key_score_terms(
        keys[None], stats, inv_freq, phasors, position, attention_scaling=attention_scaling
    )  # each (1, B, H, S)
    # The rotation averaged over the offsets maps a band's covariance σ²·I to ρ·σ²·I; the magnitude
    # factor scales the rotation like the keys' own RoPE.
    surviving = attention_scaling**2 * (phasors[0] ** 2 + phasors[1] ** 2)
    variance = (q_band_var * surviving).reshape(K, H // K, hd // 2)
    second = jnp.einsum("kgf,bksf->bkgs", variance, band_power(keys)) / (2 * hd)
    value_norm = jnp.linalg.norm(values.astype(jnp.float32), axis=-1)
    age = jnp.maximum(position[:, None, None] - key_positions, 0).astype(jnp.float32)
    per_key = jnp.stack([jnp.log(value_norm + 1e-6), jnp.log1p(age)], axis=-1)  # (B, K, S, 2)
    per_head = jnp.repeat(per_key, H // K, axis=1)  # (B, H, S, 2): heads are KV-head major
    return jnp.concatenate([jnp.stack([trig[0], norm[0], second.reshape(B, H, S)], axis=-1), per_head], axis=-1)


def group_log_output(features: jax.Array, weights: jax.Array, scored: jax.Array, num_kv_heads: int) -> jax.Array:
    """log of each key's predicted share of its GQA group's output, normalised over the scored
    keys: log Σ_g softmax(w_g·x without log ‖v‖) · ‖v‖^w_g,value, a softmax over the scored keys.

    features: (batch, heads, slots, features); weights: (heads, features); scored: (batch,
    kv_heads, slots), the keys the softmaxes run over (valid, not sinks). Returns (batch,
    kv_heads, slots), finite everywhere (meaningless off `scored`), so gradients stay defined."""
    B, H, S, _ = features.shape
    group = H // num_kv_heads
    features, weights = jnp.asarray(features), jnp.asarray(weights)
    inside = weights.at[:, VALUE_FEATURE].set(0.0)
    logits = jnp.einsum("bhsf,hf->bhs", features, inside).reshape(B, num_kv_heads, group, S)
    value_term = (features[..., VALUE_FEATURE] * weights[:, VALUE_FEATURE][None, :, None]).reshape(logits.shape)
    # A finite mask value keeps every row finite (and its gradient defined) even without a scored key.
    attention = jax.nn.log_softmax(jnp.where(scored[:, :, None], logits, MASK_VALUE), axis=-1)
    share = jax.nn.logsumexp(attention + value_term, axis=2)
    return jax.nn.log_softmax(jnp.where(scored, share, MASK_VALUE), axis=-1)


@policy_dataclass
class TriAttentionFit(EvictionPolicy):
    """Build with `TriAttentionFit.create(transformer, stats, q_band_var, weights, budget=...)`.

    weights: (layers, heads, len(FEATURES)) from `fitting.fit_scorer` (and `fitting.choose_scorer`,
    which also records the aggregation that `methods.build_policy` then uses by default);
    aggregation as TriAttention's, per_head when a fit names none: one token set per KV-head
    index shared by all layers. redundancy_weight λ > 0 ranks a layer's keys by (1 − λ) × their
    predicted share minus λ × R-KV's redundancy among the cached keys (`key_redundancy`), both
    distributions over the keys, as R-KV mixes its importance: a key whose near-copies are cached
    goes first, whatever its share (`methods.build_policy` takes the λ the fit was chosen with).
    """

    stats: FrequencyStats = array_field()
    q_band_var: jax.Array = array_field()
    weights: jax.Array = array_field()
    inv_freq: jax.Array = array_field()
    phasors: jax.Array = array_field()
    budget: int = 2048
    protect_prompt: bool = True
    window: int = 0
    aggregation: str = "per_head"
    offsets: tuple[int, ...] = DEFAULT_OFFSETS
    attention_scaling: float = 1.0
    redundancy_weight: float = 0.0
    similarity_threshold: float = SIMILARITY_THRESHOLD

    @classmethod
    def create(
        cls,
        transformer,
        stats: FrequencyStats,
        q_band_var: np.ndarray,
        weights: np.ndarray,
        *,
        offsets: tuple[int, ...] = DEFAULT_OFFSETS,
        **options,
    ) -> TriAttentionFit:
        config = transformer.config
        half = config.head_dim // 2
        expected = {
            "statistics": ((config.num_layers, config.num_heads, half), tuple(np.shape(stats.q_mean_real))),
            "q_band_var": ((config.num_layers, config.num_heads, half), tuple(np.shape(q_band_var))),
            "weights": ((config.num_layers, config.num_heads, len(FEATURES)), tuple(np.shape(weights))),
        }
        for name, (want, got) in expected.items():
            if want != got:
                raise UserError(
                    f"fitted scorer's {name} have shape {got}, the model needs {want}: run calibrate.py --fit"
                )
        check_aggregation(options.get("aggregation", "per_head"))
        if not 0 <= options.get("redundancy_weight", 0.0) <= 1:
            raise UserError(
                f"redundancy_weight={options['redundancy_weight']}: it mixes two shares, so it lies in [0, 1] "
                "(0: the fitted score alone)"
            )
        return cls(
            **scoring_fields(transformer, stats, offsets),
            q_band_var=jnp.asarray(q_band_var, jnp.float32),
            weights=jnp.asarray(weights, jnp.float32),
            **options,
        )

    def check(
        self,
        prompt_lengths: Sequence[int],
        divide_length: int,
        *,
        slim: bool = False,
        context_length: int | None = None,
    ) -> None:
        if slim:
            raise UserError(
                "triattention_fit weighs keys by ‖v‖, which a K-only (--kv_cache slim) cache does not hold: "
                "use the standard cache, or --method triattention"
            )
        super().check(prompt_lengths, divide_length, slim=slim, context_length=context_length)

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        num_kv_heads = cache.pos[0].shape[1]

        def one_layer(layer: CacheLayer, stats: FrequencyStats, q_band_var: jax.Array, weights: jax.Array) -> jax.Array:
            features = key_features(
                layer.rope_keys,
                layer.v,
                layer.pos,
                context.position,
                stats,
                q_band_var,
                self.inv_freq,
                self.phasors,
                self.attention_scaling,
            )
            scored = (layer.pos != EMPTY_POSITION) & ~sink_keys(layer.pos, SINK_POSITIONS)
            share = group_log_output(features, weights, scored, num_kv_heads)
            if self.redundancy_weight:
                redundancy = key_redundancy(layer.rope_keys, layer.pos, self.similarity_threshold)
                share = (1 - self.redundancy_weight) * jnp.exp(share) - self.redundancy_weight * redundancy
            return with_sinks_kept(share, layer.pos, SINK_POSITIONS)

        layers = range(cache.num_layers)
        layer_stats = [jax.tree.map(lambda s, i=i: s[i : i + 1], self.stats) for i in layers]
        scores = jnp.stack(
            layer_by_layer(one_layer, cache.layers(), layer_stats, list(self.q_band_var), list(self.weights))
        )
        return aggregate(scores, cache.stacked("pos") != EMPTY_POSITION, self.aggregation)


register("triattention_fit", TriAttentionFit)
