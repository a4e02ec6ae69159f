"""Converted models as orbax checkpoints: saved once, restored straight into a mesh's shardings.

A checkpoint folder holds the source's config.json, tokenizer and generation files (so it
loads anywhere a Hugging Face folder does, `decode.py --model` included), the orbax
checkpoint of the Transformer's state (`state/`, TriAttention statistics beside the weights
when saved), and `triattention_orbax.json`, which marks the folder and records the dtype and
the statistics' metadata. Restoring builds an abstract Transformer (`nnx.eval_shape`) whose
leaves are ShapeDtypeStructs carrying the target shardings, so each device reads only its own
shards and no full copy passes through the host.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from triattention_jax import sharding
from triattention_jax.checkpoints.hf import read_hf_config
from triattention_jax.checkpoints.stats import STAT_NAMES, CalibrationResult
from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer, weight_specs
from triattention_jax.scoring import FrequencyStats

MARKER = "triattention_orbax.json"
STATE_DIR = "state"
FORMAT_VERSION = 1
# Files of a checkpoint folder that hold weights (the orbax state replaces them).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".gguf")


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def _flat_arrays(state: nnx.State) -> dict[str, Any]:
    """Variable path ("layers.3.wq") -> value: string keys, which orbax stores as given."""
    return {".".join(map(str, path)): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def save_orbax(
    transformer: Transformer,
    source_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    stats: CalibrationResult | None = None,
) -> Path:
    """Writes the Transformer (and statistics, if given) as an orbax checkpoint folder at `out`,
    with the config, tokenizer and generation files of the checkpoint folder it came from.

    Everything is written under a temporary name beside `out` and renamed at the end, so an
    interrupted save never leaves a folder that looks like a checkpoint.
    """
    import orbax.checkpoint as ocp

    out = Path(out).expanduser().resolve()
    if out.exists():
        raise UserError(f"{out} already exists: remove it or choose another --out")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    if jax.process_count() > 1:
        raise UserError("save orbax checkpoints from a single process (restoring works on any number of hosts)")
    if transformer.slim:
        raise UserError("save the standard model: --kv_cache slim derives W_KV from it when loading")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for source in sorted(Path(source_dir).iterdir()):
            if source.is_file() and not source.name.endswith(_WEIGHT_SUFFIXES) and source.name != MARKER:
                shutil.copy2(source, tmp / source.name)
        tree = {"weights": _flat_arrays(nnx.state(transformer))}
        if stats is not None:
            tree["stats"] = {name: jnp.asarray(getattr(stats.stats, name), jnp.float32) for name in STAT_NAMES}
            if stats.q_band_var is not None:
                tree["stats"]["q_band_var"] = jnp.asarray(stats.q_band_var, jnp.float32)
        # Uncompressed: SmolLM2's float32 weights compress to 65% with orbax's default zstd,
        # but restoring them then took 1.2-1.5 s instead of 0.7 s on the 2-core CPU machine.
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
            checkpointer.save(tmp / STATE_DIR, args=ocp.args.PyTreeSave(tree))
        marker = {
            "format_version": FORMAT_VERSION,
            "dtype": str(transformer.dtype),
            "source": str(Path(source_dir).resolve()),
            "stats": None if stats is None else stats.metadata,
            "stats_fields": None if stats is None else sorted(tree["stats"]),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"cannot read {Path(path) / MARKER} ({e}): the orbax checkpoint is damaged; save it again"
        ) from e
    if marker.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} is an orbax checkpoint of format {marker.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}: save it again"
        )
    return marker


def abstract_transformer(config: ModelConfig, dtype: str | jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The Transformer's graphdef and a state of ShapeDtypeStructs, without allocating weights."""
    specs = weight_specs(config)
    module = nnx.eval_shape(
        lambda: Transformer(config, {name: jnp.zeros(shape, dtype) for name, (shape, _) in specs.items()}, dtype=dtype)
    )
    return nnx.split(module)


def restore_transformer(
    path: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    dtype: str | jnp.dtype | None = None,
    mesh: Mesh | None = None,
) -> tuple[Transformer, CalibrationResult | None]:
    """The Transformer of an orbax checkpoint folder (in `dtype`, default the saved one), laid
    out on `mesh` by the logical axis rules (default: the first device), and its statistics;
    `config`: its config.json, when the caller has read it already."""
    import orbax.checkpoint as ocp

    path = Path(path)
    marker = read_marker(path)
    config = config or read_hf_config(path)[0]
    if mesh is not None:
        sharding.check_model_fits(config, mesh)
    dtype = jnp.dtype(dtype or marker["dtype"])
    graphdef, abstract = abstract_transformer(config, dtype)

    def placement(variable: nnx.Variable) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return sharding.variable_sharding(variable, mesh)

    target: dict[str, Any] = {
        "weights": {
            ".".join(map(str, key)): jax.ShapeDtypeStruct(
                variable.get_value().shape, variable.get_value().dtype, sharding=placement(variable)
            )
            for key, variable in nnx.to_flat_state(abstract)
        }
    }
    if marker["stats"] is not None:
        shape = (config.num_layers, config.num_heads, config.head_dim // 2)
        replicated = (
            NamedSharding(mesh, PartitionSpec())
            if mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        )
        # Checkpoints saved before the band variance was recorded name no fields: the statistics alone.
        saved = marker.get("stats_fields", STAT_NAMES)
        target["stats"] = {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated) for name in saved}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore((path / STATE_DIR).resolve(), target)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot restore the orbax checkpoint {path} ({type(e).__name__}: {e}): save it again") from e
    weights = restored["weights"]
    state = nnx.from_flat_state(
        [(key, variable.replace(weights[".".join(map(str, key))])) for key, variable in nnx.to_flat_state(abstract)]
    )
    stats = None
    if marker["stats"] is not None:
        arrays = dict(restored["stats"])
        band_var = arrays.pop("q_band_var", None)
        stats = CalibrationResult(
            stats=FrequencyStats(**arrays),
            metadata=marker["stats"],
            q_band_var=None if band_var is None else np.asarray(band_var),
        )
    return nnx.merge(graphdef, state), stats
