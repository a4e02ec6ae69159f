"""Model configuration: one frozen dataclass for every supported decoder family."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from triattention_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Decode steps per round: eviction runs between rounds (the paper's default).
DEFAULT_DIVIDE_LENGTH = 128
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """RoPE parameters, in the vocabulary of Hugging Face's `rope_parameters`."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and options of a Llama / Qwen2 / Qwen3 decoder.

    `qkv_bias` is Qwen2's (and Llama's `attention_bias`) bias on the q/k/v projections,
    `o_bias` a bias on the output projection, `qk_norm` Qwen3's per-head RMSNorm on queries
    and keys before RoPE.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a Hugging Face `config.json` dict, refusing what we cannot run."""
        if not isinstance(hf, Mapping):
            raise UserError(f"config.json holds a {type(hf).__name__}, not a JSON object: re-download the checkpoint")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(DeepSeek-R1-Distill-Llama/Qwen load as llama/qwen2)"
            )
        _refuse_unsupported_features(model_type, hf)
        num_heads = _positive_int(hf, "num_attention_heads")
        hidden = _positive_int(hf, "hidden_size")
        head_dim = hidden // num_heads if hf.get("head_dim") is None else _positive_int(hf, "head_dim")
        num_kv_heads = _positive_int(hf, "num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise UserError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        if head_dim % 2:
            raise UserError(f"head_dim={head_dim} is odd; RoPE needs an even head_dim")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=_positive_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(hf, "intermediate_size"),
            num_layers=_positive_int(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=_positive_int(hf, "max_position_embeddings", default=4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _positive_int(hf: Mapping[str, Any], key: str, *, default: int | None = None) -> int:
    """A positive integer field of config.json; `default` when the key is absent (required without one)."""
    if key not in hf:
        if default is None:
            raise UserError(f"config.json lacks {key}: the checkpoint's config is incomplete")
        return default
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise UserError(
            f"config.json sets {key} to {json.dumps(value)}, which is not a positive integer: fix the config"
        )
    return int(value)


def _refuse_unsupported_features(model_type: str, hf: Mapping[str, Any]) -> None:
    if hf.get("use_sliding_window") or (model_type == "llama" and hf.get("sliding_window")):
        raise UserError("sliding-window attention is not supported (config sets use_sliding_window/sliding_window)")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UserError(f"sliding-window attention is not supported (layer_types has {sorted(set(layer_types))})")
    if any(key in hf for key in ("num_experts", "num_local_experts", "moe_intermediate_size")):
        raise UserError("mixture-of-experts models are not supported (config has expert settings)")
    if hf.get("no_rope_layers") or hf.get("use_rope") is False:
        raise UserError("layers without RoPE are not supported (config sets no_rope_layers/use_rope)")
    rope_params = hf.get("rope_parameters") or {}
    partial = hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"partial rotary embeddings are not supported (partial_rotary_factor={partial})")
    if hf.get("mlp_bias"):
        raise UserError("MLP biases are not supported (config sets mlp_bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"activation {hf.get('hidden_act')!r} is not supported (only silu)")


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); older configs write
    # `rope_theta` beside an optional `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"unsupported RoPE scaling {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}")
    fields = {f.name for f in dataclasses.fields(RopeConfig)}
    kwargs = {k: params[k] for k in fields & params.keys() if params[k] is not None}
    if rope_type in ("yarn", "llama3") and "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = int(hf.get("max_position_embeddings", 4096))
    kwargs.pop("rope_type", None)
    return RopeConfig(theta=theta, rope_type=rope_type, **kwargs)
