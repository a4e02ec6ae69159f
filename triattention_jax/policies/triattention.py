"""TriAttention: keys ranked by the trigonometric series of calibrated query centres (SPEC 4)."""

from __future__ import annotations

from collections.abc import Sequence

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
    check_offsets,
    check_slim_selection,
    policy_dataclass,
    register,
)
from triattention_jax.scoring import (
    DEFAULT_OFFSETS,
    FrequencyStats,
    aggregate,
    key_scores,
    normalized_scores,
    offset_phasors,
)


@policy_dataclass
class TriAttention(EvictionPolicy):
    """Build with `TriAttention.create(transformer, stats, budget=...)`.

    aggregation: per_head (default; one token set per KV-head index, shared by all layers),
    per_layer_per_head, or per_layer. trigonometric / norm_weighting switch off parts of the
    score for the paper's ablations.
    """

    stats: FrequencyStats = array_field()
    inv_freq: jax.Array = array_field()
    phasors: jax.Array = array_field()
    budget: int = 2048
    protect_prompt: bool = True
    window: int = 0
    aggregation: str = "per_head"
    offsets: tuple[int, ...] = DEFAULT_OFFSETS
    attention_scaling: float = 1.0
    trigonometric: bool = True
    norm_weighting: bool = True

    @classmethod
    def create(
        cls, transformer, stats: FrequencyStats, *, offsets: tuple[int, ...] = DEFAULT_OFFSETS, **options
    ) -> TriAttention:
        config = transformer.config
        expected = (config.num_layers, config.num_heads, config.head_dim // 2)
        if tuple(stats.q_mean_real.shape) != expected:
            raise UserError(
                f"statistics have shape {tuple(stats.q_mean_real.shape)}, the model needs {expected}: recalibrate"
            )
        check_aggregation(options.get("aggregation", "per_head"))
        check_offsets(offsets)
        return cls(**scoring_fields(transformer, stats, offsets), **options)

    def check(
        self,
        prompt_lengths: Sequence[int],
        divide_length: int,
        *,
        slim: bool = False,
        context_length: int | None = None,
    ) -> None:
        check_slim_selection(self.aggregation, slim)
        super().check(prompt_lengths, divide_length, slim=slim, context_length=context_length)

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        def one_layer(layer: CacheLayer, stats: FrequencyStats) -> jax.Array:
            return key_scores(
                layer.rope_keys[None],
                stats,
                self.inv_freq,
                self.phasors,
                context.position,
                attention_scaling=self.attention_scaling,
                trigonometric=self.trigonometric,
                norm_weighting=self.norm_weighting,
            )

        # One layer's float32 keys at a time are the scoring's scratch, not a float32 copy of K.
        layer_stats = [_layer_slice(self.stats, layer) for layer in range(cache.num_layers)]
        raw = jnp.concatenate(layer_by_layer(one_layer, cache.layers(), layer_stats))
        valid = cache.stacked("pos") != EMPTY_POSITION
        return aggregate(normalized_scores(raw, valid, cache.pos[0].shape[1]), valid, self.aggregation)


def scoring_fields(transformer, stats: FrequencyStats, offsets: tuple[int, ...]) -> dict:
    """The fields the trigonometric score needs from a model and its statistics (float32
    statistics, RoPE frequencies, offset phasors, magnitude factor): TriAttention's and
    TriAttentionFit's."""
    inv_freq = np.asarray(transformer.inv_freq[...])
    return {
        "stats": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), stats),
        "inv_freq": jnp.asarray(inv_freq),
        "phasors": jnp.asarray(offset_phasors(inv_freq, tuple(offsets))),
        "offsets": tuple(int(o) for o in offsets),
        "attention_scaling": float(transformer.attention_scaling),
    }


def _layer_slice(stats: FrequencyStats, layer: int) -> FrequencyStats:
    return jax.tree.map(lambda s: s[layer : layer + 1], stats)


register("triattention", TriAttention)
