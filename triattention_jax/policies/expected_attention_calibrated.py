"""Expected Attention with the model's calibration statistics for the queries (issue 18's
ablation): query-free like TriAttention, so nothing is observed while decoding.

μ is the calibrated pre-RoPE query mean of each head, the complex band means E[q_f] laid out as
RoPE splits a head (real parts, then imaginary parts). Calibration records per band only
E|q_f − E q_f|² = σ²_f, not the full covariance, so Σ is taken isotropic within a band,
σ²_f/2 per component; the averaged rotation R̄ then maps it to (c̄²_f + s̄²_f)·σ²_f/2 per
component, with (c̄_f, s̄_f) band f's mean cos and sin over the future positions. The rest is
Expected Attention's (`expected_attention.expected_log_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.cache import EMPTY_POSITION, CacheLayer, KVCache, layer_by_layer
from triattention_jax.policies.base import (
    EvictionPolicy,
    RoundContext,
    array_field,
    check_aggregation,
    check_offsets,
    check_slim_selection,
    policy_dataclass,
    register,
)
from triattention_jax.policies.expected_attention import (
    calibrated_moments,
    check_expected_attention,
    expected_log_scores,
    future_rotation,
)
from triattention_jax.rope import apply_rope, band_power
from triattention_jax.scoring import FrequencyStats, aggregate

if TYPE_CHECKING:
    from triattention_jax.model import Transformer


@policy_dataclass
class ExpectedAttentionCalibrated(EvictionPolicy):
    """Build with `ExpectedAttentionCalibrated.create(transformer, stats, q_band_var, budget=...)`.

    q_mean: (layers, heads, head_dim) pre-RoPE query means; q_band_var: (layers, heads,
    head_dim/2) the query variance per band. aggregation as TriAttention's, per_head by default
    (one token set per KV-head index, the layers' log scores averaged): on SmolLM2 at budget
    512 a set per (layer, KV head) was further from full attention on 6/6 texts (KL 1.23×,
    WORKSPACE, session 16). offsets: the future distances R̄ averages over, instead of kvpress's
    0 … n_future_positions − 1 (`max_offset=N`: the paper's 1, 2, 4, … N). Other fields as
    `ExpectedAttention`'s.
    """

    q_mean: jax.Array = array_field()
    q_band_var: jax.Array = array_field()
    inv_freq: jax.Array = array_field()
    budget: int = 2048
    protect_prompt: bool = False
    window: int = 0
    aggregation: str = "per_head"
    attention_scaling: float = 1.0
    n_future_positions: int = 512
    offsets: tuple[int, ...] | None = None
    n_sink: int = 4
    use_covariance: bool = True
    use_value_norm: bool = True

    @classmethod
    def create(
        cls, transformer: Transformer, stats: FrequencyStats, q_band_var: np.ndarray, **options: Any
    ) -> ExpectedAttentionCalibrated:
        """The policy with `transformer`'s RoPE, the calibrated band means of `stats` and the
        same calibration's `q_band_var`."""
        q_mean, q_band_var = calibrated_moments(transformer, stats, q_band_var)
        check_aggregation(options.get("aggregation", "per_head"))
        return cls(
            q_mean=jnp.asarray(q_mean, jnp.float32),
            q_band_var=jnp.asarray(q_band_var, jnp.float32),
            inv_freq=jnp.asarray(np.asarray(transformer.inv_freq[...]), jnp.float32),
            attention_scaling=float(transformer.attention_scaling),
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
        check_expected_attention(self, "expected_attention_calibrated", slim)
        check_slim_selection(self.aggregation, slim)
        if self.offsets is not None:
            check_offsets(self.offsets)
        super().check(prompt_lengths, divide_length, slim=slim, context_length=context_length)

    def layer_scores(
        self, layer: CacheLayer, q_mean: jax.Array, q_band_var: jax.Array, rotation: tuple[jax.Array, jax.Array]
    ) -> jax.Array:
        """One layer's log scores (batch, kv_heads, slots). q_mean: (heads, head_dim);
        q_band_var: (heads, head_dim/2); rotation: `future_rotation`'s (cos, sin)."""
        keys = layer.rope_keys.astype(jnp.float32)  # (B, K, S, hd), post-RoPE
        B, K, S, hd = keys.shape
        H = q_mean.shape[0]
        cos, sin = rotation
        mean = apply_rope(q_mean[None], cos[:, None], sin[:, None]).reshape(B, K, H // K, hd)
        logits = jnp.einsum("bkgd,bksd->bkgs", mean, keys) * hd**-0.5
        if self.use_covariance:
            component_var = q_band_var[None] / 2 * (cos**2 + sin**2)[:, None]  # (B, H, hd/2): R̄ΣR̄ᵀ
            component_var = component_var.reshape(B, K, H // K, hd // 2)
            logits += jnp.einsum("bkgf,bksf->bkgs", component_var, band_power(keys)) / (2 * hd)
        return expected_log_scores(layer, logits, self.n_sink, self.use_value_norm)

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        offsets = self.offsets or range(self.n_future_positions)
        rotation = future_rotation(context.position, self.inv_freq, self.attention_scaling, offsets)

        def one_layer(layer: CacheLayer, q_mean: jax.Array, q_band_var: jax.Array) -> jax.Array:
            return self.layer_scores(layer, q_mean, q_band_var, rotation)

        scores = jnp.stack(layer_by_layer(one_layer, cache.layers(), list(self.q_mean), list(self.q_band_var)))
        return aggregate(scores, cache.stacked("pos") != EMPTY_POSITION, self.aggregation)


register("expected_attention_calibrated", ExpectedAttentionCalibrated)
