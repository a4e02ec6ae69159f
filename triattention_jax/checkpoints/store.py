"""The model store: what a `--model` argument names (a checkpoint folder, a folder under
models/, the embedded default, a hub id) resolved to a `LoadedModel`. The only module that
knows every checkpoint format."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from triattention_jax import sharding
from triattention_jax.checkpoints import gguf, orbax
from triattention_jax.checkpoints.hf import load_transformer, read_hf_config, to_dtype
from triattention_jax.checkpoints.stats import CalibrationResult
from triattention_jax.checkpoints.tokenizer import load_tokenizer
from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def models_dir() -> Path:
    """The local model store: $TRIATTENTION_MODELS, else the repository's models/ folder."""
    env = os.environ.get("TRIATTENTION_MODELS")
    if env:
        return Path(env)
    if (PACKAGE_ROOT / "pyproject.toml").exists():
        return PACKAGE_ROOT / "models"
    return Path.home() / ".cache" / "triattention_jax" / "models"


def resolve_model_dir(model: str) -> Path:
    """A checkpoint folder for a path, a GGUF file or a packaged model name (converted into
    models/ on first use), a folder name under models/, or a hub id."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf.ensure_file_converted(path, models_dir() / path.stem.lower())
    if path.is_dir():
        return path
    local = models_dir() / model
    if model in gguf.PACKAGED_MODELS:
        return gguf.ensure_packaged(model, local)
    if local.is_dir():
        return local
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise UserError(
            f"model {model!r} not found: give a checkpoint folder, a .gguf file, a folder name under {models_dir()} "
            f"(or one of {', '.join(gguf.PACKAGED_MODELS)}), or a hub id like org/name"
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
    `stats`: TriAttention statistics that came with the checkpoint (orbax checkpoints carry them);
    `mesh`: the mesh the weights are laid out on (None: one device)."""

    config: ModelConfig
    transformer: Transformer
    tokenizer: Any
    path: Path
    name: str
    stats: CalibrationResult | None = None
    mesh: Mesh | None = None

    @property
    def store_dir(self) -> Path:
        """This model's folder in the local model store (for calibration statistics)."""
        return models_dir() / self.name


def load_model(
    model: str,
    *,
    dtype: str | jnp.dtype = "bfloat16",
    mesh: Mesh | None = None,
    mesh_for: Callable[[ModelConfig, Any], Mesh | None] | None = None,
) -> LoadedModel:
    """Loads a checkpoint folder (Hugging Face safetensors, or an orbax checkpoint written by
    `python -m triattention_jax.cli.orbax`), a models/ folder name, or a hub id, in `dtype`,
    with its tokenizer; with a mesh, the weights are laid out on it
    (`sharding.LOGICAL_AXIS_RULES`). mesh_for: instead of a mesh, called with the config and
    the tokenizer before any weight is read, returns the mesh (`--mesh auto`)."""
    model_dir = resolve_model_dir(model)
    config, _ = read_hf_config(model_dir)
    # Read first only when the mesh depends on it: a broken weights file is reported first.
    tokenizer = None
    if mesh_for is not None:
        tokenizer = load_tokenizer(model_dir)
        mesh = mesh_for(config, tokenizer)
    stats = None
    if orbax.is_orbax_checkpoint(model_dir):
        transformer, stats = orbax.restore_transformer(model_dir, config=config, dtype=to_dtype(dtype), mesh=mesh)
    else:
        transformer = load_transformer(model_dir, dtype=dtype, config=config)
        if mesh is not None:
            transformer = sharding.shard_transformer(transformer, mesh)
    return LoadedModel(
        config=config,
        transformer=transformer,
        tokenizer=load_tokenizer(model_dir) if tokenizer is None else tokenizer,
        path=model_dir,
        name=store_name(model, model_dir),
        stats=stats,
        mesh=mesh,
    )


def store_name(model: str, model_dir: Path) -> str:
    """The models/ folder name for a model argument: itself, a hub id with '/' as '--', or the folder's name."""
    if model_dir.resolve().parent == models_dir().resolve():
        return model_dir.name
    if not Path(model).expanduser().is_dir() and model.count("/") == 1:
        return model.replace("/", "--")
    return model_dir.resolve().name
