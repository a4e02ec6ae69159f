"""Hugging Face checkpoint folders: config.json and safetensors into a `Transformer`, HF weight
names mapped to ours by rule, every shape asserted against the config."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import einops
import jax.numpy as jnp
import numpy as np

from triattention_jax.checkpoints.safetensors_io import read_safetensors
from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer, weight_specs


# HF name (with the layer index captured) -> (our name, how the HF matrix becomes ours). HF
# stores a projection as (out, in) with the heads' dims concatenated in `out`.
def _heads_in(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """q/k/v projection (heads*hd, D) -> (D, heads, hd)."""
    return einops.rearrange(w, "(heads dim) embed -> embed heads dim", dim=c.head_dim)


def _bias_heads(b: np.ndarray, c: ModelConfig) -> np.ndarray:
    return einops.rearrange(b, "(heads dim) -> heads dim", dim=c.head_dim)


def _heads_out(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """o projection (D, heads*hd) -> (heads, hd, D)."""
    return einops.rearrange(w, "embed (heads dim) -> heads dim embed", dim=c.head_dim)


def _same(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w


def _transpose(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w.T


_LAYER_RULES: dict[str, tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray]]] = {
    "input_layernorm.weight": ("attn_norm", _same),
    "self_attn.q_proj.weight": ("wq", _heads_in),
    "self_attn.k_proj.weight": ("wk", _heads_in),
    "self_attn.v_proj.weight": ("wv", _heads_in),
    "self_attn.q_proj.bias": ("bq", _bias_heads),
    "self_attn.k_proj.bias": ("bk", _bias_heads),
    "self_attn.v_proj.bias": ("bv", _bias_heads),
    "self_attn.o_proj.weight": ("wo", _heads_out),
    "self_attn.o_proj.bias": ("bo", _same),
    "self_attn.q_norm.weight": ("q_norm", _same),
    "self_attn.k_norm.weight": ("k_norm", _same),
    "post_attention_layernorm.weight": ("mlp_norm", _same),
    "mlp.gate_proj.weight": ("w_gate", _transpose),
    "mlp.up_proj.weight": ("w_up", _transpose),
    "mlp.down_proj.weight": ("w_down", _transpose),
}
_GLOBAL_RULES = {
    "model.embed_tokens.weight": ("embed", _same),
    "model.norm.weight": ("final_norm", _same),
    "lm_head.weight": ("lm_head", _transpose),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def convert_hf_weights(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors -> our layer-stacked weights, asserting every shape against the config."""
    specs = weight_specs(config)
    per_layer: dict[str, list[np.ndarray | None]] = {}
    weights: dict[str, np.ndarray] = {}
    for hf_name, tensor in tensors.items():
        match = _LAYER_NAME.fullmatch(hf_name)
        if match:
            index, rest = int(match.group(1)), match.group(2)
            if rest not in _LAYER_RULES or index >= config.num_layers:
                raise UserError(f"checkpoint tensor {hf_name} is not part of a {config.model_type} model we support")
            name, transform = _LAYER_RULES[rest]
            slots = per_layer.setdefault(name, [None] * config.num_layers)
            slots[index] = _converted(hf_name, tensor, transform, config, specs, name, per_layer=True)
        elif hf_name in _GLOBAL_RULES:
            name, transform = _GLOBAL_RULES[hf_name]
            if name == "lm_head" and config.tie_word_embeddings:
                continue
            weights[name] = _converted(hf_name, tensor, transform, config, specs, name, per_layer=False)
        elif not hf_name.endswith("rotary_emb.inv_freq"):
            raise UserError(f"checkpoint tensor {hf_name} is not part of a {config.model_type} model we support")
    for name, slots in per_layer.items():
        absent = [i for i, s in enumerate(slots) if s is None]
        if absent:
            raise UserError(f"checkpoint lacks {name} for layers {absent}: the checkpoint is incomplete")
        weights[name] = np.stack(slots)
    missing = specs.keys() - weights.keys()
    if missing:
        raise UserError(f"checkpoint lacks weights {sorted(missing)} that the config needs")
    return weights


def _converted(
    hf_name: str, tensor: np.ndarray, transform, config: ModelConfig, specs: Mapping, name: str, *, per_layer: bool
) -> np.ndarray:
    if name not in specs:
        raise UserError(f"checkpoint has {hf_name}, which the config does not call for")
    expected = tuple(specs[name][0][1:] if per_layer else specs[name][0])
    mismatch = UserError(
        f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, which does not fit the config "
        f"(expected {expected} after conversion): config.json and the weights disagree"
    )
    try:
        array = transform(np.asarray(tensor), config)
    except (ValueError, einops.EinopsError) as e:
        raise mismatch from e
    if array.shape != expected:
        raise mismatch
    return array


def read_hf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Tensors of `model.safetensors`, or of every shard named by `model.safetensors.index.json`."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        shards = [p.name for p in sorted(model_dir.glob("model*.safetensors"))]
    if not shards:
        raise UserError(f"no model*.safetensors weights in {model_dir}: convert the checkpoint to safetensors first")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        if not (model_dir / shard).exists():
            raise UserError(f"shard {shard} named by the index is missing from {model_dir}")
        tensors.update(read_safetensors(model_dir / shard))
    return tensors


def read_hf_config(model_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{model_dir} has no config.json: point --model at a Hugging Face checkpoint folder")
    hf = _read_json(path)
    generation = model_dir / "generation_config.json"
    if generation.exists():
        settings = _read_json(generation)
        eos = settings.get("eos_token_id") if isinstance(settings, dict) else None
        if eos is not None and isinstance(hf, dict):
            hf = {**hf, "eos_token_id": eos}
    try:
        return ModelConfig.from_hf(hf), hf
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} has a malformed value ({e}): fix or re-download the checkpoint's config") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): re-download the checkpoint") from e


def load_transformer(
    model_dir: Path, *, dtype: str | jnp.dtype = "bfloat16", config: ModelConfig | None = None
) -> Transformer:
    """The weights of a checkpoint folder as a `Transformer`, converted and shape-checked
    (`config`: its config.json, when the caller has read it already)."""
    config = config or read_hf_config(model_dir)[0]
    return Transformer(config, convert_hf_weights(config, read_hf_tensors(model_dir)), dtype=to_dtype(dtype))


def to_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """A supported weights dtype from its name."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise UserError(f"unknown dtype {dtype!r}: use bfloat16 or float32") from e
    if resolved not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
        raise UserError(f"unsupported dtype {resolved}: use bfloat16 or float32")
    return resolved
