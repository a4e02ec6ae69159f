"""Flags more than one command line takes, each defined here once; a command calls the
`define_*` functions it needs when its module is imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import flags

from triattention_jax.checkpoints.gguf import DEFAULT_MODEL_NAME
from triattention_jax.errors import UserError

if TYPE_CHECKING:
    from triattention_jax.methods import PolicySettings

FLAGS = flags.FLAGS
DTYPES = ["bfloat16", "float32"]


def define_model(extra: str = "") -> None:
    flags.DEFINE_string(
        "model",
        DEFAULT_MODEL_NAME,
        "HF checkpoint folder, orbax checkpoint folder (written by "
        "python -m triattention_jax.cli.orbax), hub id, or a folder name under models/." + extra,
    )


def define_dtype(default: str, help_text: str = "Weights and KV cache dtype.") -> None:
    flags.DEFINE_enum("dtype", default, DTYPES, help_text)


def define_mesh(help_text: str) -> None:
    flags.DEFINE_string("mesh", None, help_text)


def define_budget(help_text: str = "KV entries kept per (layer, KV head) by eviction methods.") -> None:
    flags.DEFINE_integer("budget", 2048, help_text)


def define_slack_trigger() -> None:
    flags.DEFINE_bool(
        "slack_trigger",
        False,
        "Compact exactly when the buffer holds budget + divide_length tokens, as the official TriAttention "
        "code's use_slack_trigger does (the same compaction steps, for prompts within the budget); default: "
        "at the first round boundary past the budget, rounds counted from the start of decoding.",
    )


def define_stats(
    help_text: str = "TriAttention statistics (.safetensors or reference .pt); default: the model "
    "folder's, the package's, or calibrated on first use.",
) -> None:
    flags.DEFINE_string("stats", None, help_text)


def define_policy_settings() -> None:
    """The flags of `methods.PolicySettings` (read back by `policy_settings`)."""
    define_budget()
    define_stats()
    define_slack_trigger()
    flags.DEFINE_bool(
        "protect_prompt",
        None,
        "Never evict prompt tokens (they count toward the budget); default: on "
        "for triattention, off for the baselines.",
    )
    flags.DEFINE_integer(
        "window", None, "Never evict the most recent N tokens; default: the method's (0 for triattention)."
    )
    flags.DEFINE_enum(
        "aggregation",
        None,
        ["per_head", "per_layer_per_head", "per_layer"],
        "How TriAttention and triattention_fit share token sets across layers and heads; default: per_head.",
    )
    flags.DEFINE_string("fitted_scorer", None, "triattention_fit's weights (calibrate.py --fit); default: the model's.")
    flags.DEFINE_list("offsets", None, "TriAttention future offsets; default: 1, 2, 4, ..., 65536.")
    flags.DEFINE_bool("trig_term", True, "TriAttention's trigonometric term (off: the paper's ablation).")
    flags.DEFINE_bool(
        "norm_weighting", True, "Weight TriAttention's norm term by (1 - R_f) (off: the paper's ablation)."
    )


def policy_settings(**overrides: object) -> PolicySettings:
    """`PolicySettings` from the flags `define_policy_settings` defined (`overrides` win)."""
    from triattention_jax.methods import PolicySettings

    offsets = None
    if FLAGS.offsets is not None:
        try:
            offsets = tuple(int(v) for v in FLAGS.offsets)
        except ValueError as e:
            raise UserError(f"--offsets takes comma-separated integers: {e}") from e
    values = dict(
        budget=FLAGS.budget,
        protect_prompt=FLAGS.protect_prompt,
        window=FLAGS.window,
        stats=FLAGS.stats,
        aggregation=FLAGS.aggregation,
        offsets=offsets,
        trigonometric=FLAGS.trig_term,
        norm_weighting=FLAGS.norm_weighting,
        slack_trigger=FLAGS.slack_trigger,
        fitted_scorer=FLAGS.fitted_scorer,
    )
    return PolicySettings(**{**values, **overrides})


def integers(values: list[str], flag: str) -> list[int]:
    """A list flag's values as integers."""
    try:
        return [int(v) for v in values]
    except ValueError as e:
        raise UserError(f"--{flag} takes comma-separated integers: {e}") from e
