"""Loading Hugging Face checkpoints: resolve a model name, read config and safetensors,
map HF weight names to ours by rule and assert every shape."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer, weight_specs
from triattention_jax.safetensors_io import read_safetensors
from triattention_jax.stats import CalibrationResult
from triattention_jax.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from jax.sharding import Mesh

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    """The local model store: $TRIATTENTION_MODELS, else the repository's models/ folder."""
    env = os.environ.get("TRIATTENTION_MODELS")
    if env:
        return Path(env)
    if (PACKAGE_ROOT / "pyproject.toml").exists():
        return PACKAGE_ROOT / "models"
    return Path.home() / ".cache" / "triattention_jax" / "models"


# HF name (with the layer index captured) -> (our name, how the HF matrix becomes ours).
def _heads_in(num_heads: Callable[[ModelConfig], int]) -> Callable[[np.ndarray, ModelConfig], np.ndarray]:
    """(heads*hd, D) projection -> (D, heads, hd)."""
    return lambda w, c: w.T.reshape(c.hidden_size, num_heads(c), c.head_dim)


def _bias_heads(num_heads: Callable[[ModelConfig], int]) -> Callable[[np.ndarray, ModelConfig], np.ndarray]:
    return lambda b, c: b.reshape(num_heads(c), c.head_dim)


def _q_heads(c: ModelConfig) -> int:
    return c.num_heads


def _kv_heads(c: ModelConfig) -> int:
    return c.num_kv_heads


def _same(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w


def _transpose(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w.T


_LAYER_RULES: dict[str, tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray]]] = {
    "input_layernorm.weight": ("attn_norm", _same),
    "self_attn.q_proj.weight": ("wq", _heads_in(_q_heads)),
    "self_attn.k_proj.weight": ("wk", _heads_in(_kv_heads)),
    "self_attn.v_proj.weight": ("wv", _heads_in(_kv_heads)),
    "self_attn.q_proj.bias": ("bq", _bias_heads(_q_heads)),
    "self_attn.k_proj.bias": ("bk", _bias_heads(_kv_heads)),
    "self_attn.v_proj.bias": ("bv", _bias_heads(_kv_heads)),
    "self_attn.o_proj.weight": ("wo", lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)),
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


def _converted(hf_name: str, tensor: np.ndarray, transform, config: ModelConfig, specs: Mapping, name: str, *, per_layer: bool) -> np.ndarray:
    if name not in specs:
        raise UserError(f"checkpoint has {hf_name}, which the config does not call for")
    expected = tuple(specs[name][0][1:] if per_layer else specs[name][0])
    mismatch = UserError(
        f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, which does not fit the config "
        f"(expected {expected} after conversion): config.json and the weights disagree"
    )
    try:
        array = transform(np.asarray(tensor), config)
    except ValueError as e:
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


def resolve_model_dir(model: str) -> Path:
    """A checkpoint folder for a path, a folder name under models/, or a hub id."""
    from triattention_jax import embedded

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    local = models_dir() / model
    if model == embedded.DEFAULT_MODEL_NAME:
        return embedded.ensure_converted(local)
    if local.is_dir():
        return local
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise UserError(
            f"model {model!r} not found: give a checkpoint folder, a folder name under {models_dir()}, or a hub id like org/name"
        )
    return _hub_snapshot(model)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except HFValidationError as e:
        raise UserError(f"{repo_id!r} is not a valid hub id or local path: {e}") from e
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise UserError(
            f"cannot get {repo_id!r} from the Hugging Face hub or its local cache ({type(e).__name__}): "
            "check the id and the network, or pass a local checkpoint folder"
        ) from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model ready to decode: config, weights (an NNX module), tokenizer and where it came from;
    `stats`: TriAttention statistics that came with the checkpoint (orbax checkpoints carry them)."""

    config: ModelConfig
    transformer: Transformer
    tokenizer: Any
    path: Path
    name: str
    stats: CalibrationResult | None = None

    @property
    def store_dir(self) -> Path:
        """This model's folder in the local model store (for calibration statistics)."""
        return models_dir() / self.name


def load_transformer(model_dir: Path, *, dtype: str | jnp.dtype = "bfloat16") -> Transformer:
    """The weights of a checkpoint folder as a `Transformer`, converted and shape-checked."""
    config, _ = read_hf_config(model_dir)
    return Transformer(config, convert_hf_weights(config, read_hf_tensors(model_dir)), dtype=_dtype(dtype))


def load_model(model: str, *, dtype: str | jnp.dtype = "bfloat16", mesh: "Mesh | None" = None) -> LoadedModel:
    """Loads a checkpoint folder (Hugging Face safetensors, or an orbax checkpoint written by
    `orbax_store`), a models/ folder name, or a hub id, in `dtype`, with its tokenizer; with a
    mesh, the weights are laid out on it (`sharding.LOGICAL_AXIS_RULES`)."""
    from triattention_jax import orbax_store, sharding

    model_dir = resolve_model_dir(model)
    stats = None
    if orbax_store.is_orbax_checkpoint(model_dir):
        transformer, stats = orbax_store.restore_transformer(model_dir, dtype=_dtype(dtype), mesh=mesh)
    else:
        if mesh is not None:
            sharding.check_model_fits(read_hf_config(model_dir)[0], mesh)
        transformer = load_transformer(model_dir, dtype=dtype)
        if mesh is not None:
            transformer = sharding.shard_transformer(transformer, mesh)
    return LoadedModel(
        config=transformer.config, transformer=transformer, tokenizer=load_tokenizer(model_dir), path=model_dir,
        name=store_name(model, model_dir), stats=stats,
    )


def store_name(model: str, model_dir: Path) -> str:
    """The models/ folder name for a model argument: itself, a hub id with '/' as '--', or the folder's name."""
    if model_dir.resolve().parent == models_dir().resolve():
        return model_dir.name
    if not Path(model).expanduser().is_dir() and model.count("/") == 1:
        return model.replace("/", "--")
    return model_dir.resolve().name


def _dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise UserError(f"unknown dtype {dtype!r}: use bfloat16 or float32") from e
    if resolved not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
        raise UserError(f"unsupported dtype {resolved}: use bfloat16 or float32")
    return resolved
