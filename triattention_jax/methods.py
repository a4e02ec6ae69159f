"""A method name and its settings -> the policy for a loaded model: the one place that turns
what a command line says into a `KVPolicy` (defaults, "name:option=value" variants, TriAttention
statistics found or calibrated on first use)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from triattention_jax.calibration import stats_for_model
from triattention_jax.checkpoints.stats import load_stats
from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer
from triattention_jax.policies import EvictionPolicy, ExpectedAttention, KVPolicy, TriAttention, policy_class
from triattention_jax.scoring import DEFAULT_OFFSETS, FrequencyStats


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """What the command line says about a policy; each policy takes what applies to it.
    protect_prompt and window left as None take the method's own defaults."""

    budget: int = 2048
    protect_prompt: bool | None = None
    window: int | None = None
    stats: str | None = None
    aggregation: str = "per_head"
    offsets: tuple[int, ...] | None = None
    trigonometric: bool = True
    norm_weighting: bool = True


def _boolean(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


# Options a method variant may set ("triattention:aggregation=per_layer;max_offset=4096"), for
# ablations: name -> (PolicySettings field, how the text becomes its value).
VARIANT_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "aggregation": ("aggregation", str),
    "window": ("window", int),
    "max_offset": ("offsets", lambda text: tuple(2**i for i in range(int(text).bit_length()))),
    "trig_term": ("trigonometric", _boolean),
    "norm_weighting": ("norm_weighting", _boolean),
    "protect_prompt": ("protect_prompt", _boolean),
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
    stats: FrequencyStats | None = None,
) -> KVPolicy:
    """The policy `method` names (a variant's options override `settings`) for `model`.

    TriAttention's statistics: `stats` when given, else `settings.stats` (a file), else the
    loaded model's own (`calibration.stats_for_model`: the checkpoint's, the model folder's, the
    package's, or calibrated once); a bare `Transformer` needs one of the first two.
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
    }
    transformer = model if isinstance(model, Transformer) else model.transformer
    if cls is ExpectedAttention:  # scores with the model's own RoPE
        return ExpectedAttention.create(transformer, **options)
    if cls is not TriAttention:
        return cls(**options)
    if stats is None and isinstance(model, Transformer):
        if settings.stats is None:
            raise UserError("TriAttention needs statistics: pass stats=, a statistics file, or what load_model returns")
        stats = load_stats(settings.stats, transformer).stats
    elif stats is None:
        stats = stats_for_model(model, settings.stats).stats
    return TriAttention.create(
        transformer,
        stats,
        aggregation=settings.aggregation,
        offsets=settings.offsets or DEFAULT_OFFSETS,
        trigonometric=settings.trigonometric,
        norm_weighting=settings.norm_weighting,
        **options,
    )
