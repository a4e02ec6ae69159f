"""A method name and its settings -> the policy for a loaded model: the one place that turns
what a command line says into a `KVPolicy` (defaults, "name:option=value" variants, TriAttention
statistics found or calibrated on first use)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from triattention_jax.calibration import fit_for_model, stats_for_model
from triattention_jax.checkpoints.stats import CalibrationResult, FitResult, load_fit, load_stats
from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer
from triattention_jax.policies import (
    EvictionPolicy,
    ExpectedAttention,
    ExpectedAttentionCalibrated,
    KVPolicy,
    TriAttention,
    TriAttentionFit,
    policy_class,
)
from triattention_jax.policies.expected_attention import calibrated_moments
from triattention_jax.policies.triattention_fit import FEATURES
from triattention_jax.scoring import DEFAULT_OFFSETS, FrequencyStats


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """What the command line says about a policy; each policy takes what applies to it.
    protect_prompt, window and aggregation left as None take the method's own defaults;
    fitted_scorer: triattention_fit's weights (a file; default: the model's); slack_trigger: the
    official implementation's compaction phase (`EvictionPolicy`); redundancy_weight:
    triattention_fit's mix with R-KV's redundancy among the cached keys (`TriAttentionFit`),
    None: the one its fit was chosen with, else 0."""

    budget: int = 2048
    protect_prompt: bool | None = None
    window: int | None = None
    stats: str | None = None
    aggregation: str | None = None
    offsets: tuple[int, ...] | None = None
    trigonometric: bool = True
    norm_weighting: bool = True
    slack_trigger: bool = False
    fitted_scorer: str | None = None
    prior_count: int = 0
    redundancy_weight: float | None = None


def _offsets_up_to(largest: int) -> tuple[int, ...]:
    if largest < 1:
        raise ValueError(f"max_offset must be at least 1, got {largest}")
    return tuple(2**i for i in range(largest.bit_length()))


def _boolean(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


# Options a method variant may set ("triattention:aggregation=per_layer;max_offset=4096"), for
# ablations: name -> (PolicySettings field, how the text becomes its value).
VARIANT_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "aggregation": ("aggregation", str),
    "window": ("window", int),
    "max_offset": ("offsets", lambda text: _offsets_up_to(int(text))),
    "trig_term": ("trigonometric", _boolean),
    "norm_weighting": ("norm_weighting", _boolean),
    "protect_prompt": ("protect_prompt", _boolean),
    "slack_trigger": ("slack_trigger", _boolean),
    "fitted_scorer": ("fitted_scorer", str),
    "prior_count": ("prior_count", int),
    "redundancy_weight": ("redundancy_weight", float),
}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """ "name" or "name:option=value;option=value" (see VARIANT_OPTIONS) -> (name, PolicySettings fields).

    max_offset=N scores over the future offsets 1, 2, 4, ... up to N (the paper's offset range).
    """
    name, _, options = spec.partition(":")
    policy_class(name)
    settings: dict[str, Any] = {}
    for option in filter(None, options.split(";")):
        key, _, value = option.partition("=")
        if key not in VARIANT_OPTIONS or not value:
            raise UserError(
                f"method variant {spec!r}: options are {', '.join(f'{k}=...' for k in VARIANT_OPTIONS)}, "
                f"separated by ';' (got {option!r})"
            )
        field, convert = VARIANT_OPTIONS[key]
        try:
            settings[field] = convert(value)
        except (KeyError, ValueError) as e:
            raise UserError(f"method variant {spec!r}: bad value for {key}: {value!r}") from e
    return name, settings


def build_policy(
    model: LoadedModel | Transformer,
    method: str,
    settings: PolicySettings = PolicySettings(),
    *,
    stats: FrequencyStats | CalibrationResult | None = None,
    fit: FitResult | None = None,
) -> KVPolicy:
    """The policy `method` names (a variant's options override `settings`) for `model`.

    TriAttention's statistics: `stats` when given, else `settings.stats` (a file), else the
    loaded model's own (`calibration.stats_for_model`: the checkpoint's, the model folder's, the
    package's, or calibrated once); a bare `Transformer` needs one of the first two.
    triattention_fit's weights likewise: `fit`, else `settings.fitted_scorer`, else the loaded
    model's (`calibration.fit_for_model`). expected_attention_calibrated, and expected_attention
    with prior_count, also need the calibration's band variance, which a `CalibrationResult`
    (or a statistics file) carries.
    """
    name, overrides = parse_method(method)
    settings = dataclasses.replace(settings, **overrides)
    cls = policy_class(name)
    if not issubclass(cls, EvictionPolicy):
        return cls()
    options = {
        "budget": settings.budget,
        "protect_prompt": cls.default_protect_prompt() if settings.protect_prompt is None else settings.protect_prompt,
        "window": cls.default_window(settings.budget) if settings.window is None else settings.window,
        "slack_trigger": settings.slack_trigger,
    }
    transformer = model if isinstance(model, Transformer) else model.transformer
    if cls not in (TriAttention, TriAttentionFit, ExpectedAttentionCalibrated, ExpectedAttention):
        return cls(**options)
    if settings.aggregation is not None:
        options["aggregation"] = settings.aggregation
    if cls is ExpectedAttention and not settings.prior_count:  # scores with the model's own RoPE
        return ExpectedAttention.create(transformer, **options)
    if stats is None and isinstance(model, Transformer):
        if settings.stats is None:
            raise UserError(f"{name} needs statistics: pass stats=, a statistics file, or what load_model returns")
        stats = load_stats(settings.stats, transformer)
    elif stats is None:
        stats = stats_for_model(model, settings.stats)
    if cls in (ExpectedAttention, ExpectedAttentionCalibrated):
        band_var = stats.q_band_var if isinstance(stats, CalibrationResult) else None
        if band_var is None:
            raise UserError(
                f"{method} needs the query variance per band, which these statistics lack (files from before it "
                "was recorded, the reference .pt format): run python calibrate.py --out FILE and pass --stats FILE"
            )
        if cls is ExpectedAttention:
            q_mean, band_var = calibrated_moments(transformer, stats.stats, band_var)
            return ExpectedAttention.create(transformer, **options).with_prior(q_mean, band_var, settings.prior_count)
    if cls is ExpectedAttentionCalibrated:
        if settings.offsets:
            options["offsets"] = settings.offsets
        return ExpectedAttentionCalibrated.create(transformer, stats.stats, band_var, **options)
    if isinstance(stats, CalibrationResult):
        stats = stats.stats
    offsets = settings.offsets or DEFAULT_OFFSETS
    if cls is TriAttentionFit:
        if fit is None and isinstance(model, Transformer):
            if settings.fitted_scorer is None:
                raise UserError(
                    "triattention_fit needs fitted weights: pass fit=, a fitted_scorer file, or what load_model returns"
                )
            fit = load_fit(settings.fitted_scorer, transformer, FEATURES)
        elif fit is None:
            fit = fit_for_model(model, FEATURES, settings.fitted_scorer)
        # A fit chosen by `fitting.choose_scorer` records the aggregation and redundancy weight it
        # was chosen with.
        options.setdefault("aggregation", fit.metadata.get("aggregation", "per_head"))
        redundancy_weight = settings.redundancy_weight
        if redundancy_weight is None:
            redundancy_weight = fit.metadata.get("redundancy_weight", 0.0)
        return TriAttentionFit.create(
            transformer,
            stats,
            fit.q_band_var,
            fit.weights,
            offsets=offsets,
            redundancy_weight=redundancy_weight,
            **options,
        )
    return TriAttention.create(
        transformer,
        stats,
        offsets=offsets,
        trigonometric=settings.trigonometric,
        norm_weighting=settings.norm_weighting,
        **options,
    )
