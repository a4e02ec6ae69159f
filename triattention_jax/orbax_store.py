"""Converted models as orbax checkpoints: saved once, restored straight into a mesh's shardings.

  python -m triattention_jax.orbax_store --model smollm2-135m-instruct --out models/smollm2-orbax
  python decode.py --model models/smollm2-orbax --mesh data=2 --prompt "..."
  python -m triattention_jax.orbax_store --model smollm2-135m-instruct --time_reload --json results/reload.json

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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from triattention_jax import embedded
from triattention_jax.checkpoint import read_hf_config
from triattention_jax.cli import run_cli
from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer, weight_specs
from triattention_jax.scoring import FrequencyStats
from triattention_jax.stats import CalibrationResult

MARKER = "triattention_orbax.json"
STATE_DIR = "state"
FORMAT_VERSION = 1
STATS_FIELDS = ("q_mean_real", "q_mean_imag", "q_abs_mean")
# Files of a checkpoint folder that hold weights (the orbax state replaces them).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".gguf")


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def _flat_arrays(state: nnx.State) -> dict[str, Any]:
    """Variable path ("layers.3.wq") -> value: string keys, which orbax stores as given."""
    return {".".join(map(str, path)): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def save_orbax(transformer: Transformer, source_dir: str | os.PathLike, out: str | os.PathLike, *,
               stats: CalibrationResult | None = None) -> Path:
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
            tree["stats"] = {name: jnp.asarray(getattr(stats.stats, name), jnp.float32) for name in STATS_FIELDS}
        # Uncompressed: SmolLM2's float32 weights compress to 65% with orbax's default zstd,
        # but restoring them then took 1.2-1.5 s instead of 0.7 s on the 2-core CPU machine.
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
            checkpointer.save(tmp / STATE_DIR, args=ocp.args.PyTreeSave(tree))
        marker = {"format_version": FORMAT_VERSION, "dtype": str(transformer.dtype), "source": str(Path(source_dir).resolve()),
                  "stats": None if stats is None else stats.metadata}
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
        raise UserError(f"cannot read {Path(path) / MARKER} ({e}): the orbax checkpoint is damaged; save it again") from e
    if marker.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is an orbax checkpoint of format {marker.get('format_version')}, this code reads "
                        f"{FORMAT_VERSION}: save it again")
    return marker


def abstract_transformer(config: ModelConfig, dtype: str | jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The Transformer's graphdef and a state of ShapeDtypeStructs, without allocating weights."""
    specs = weight_specs(config)
    module = nnx.eval_shape(lambda: Transformer(config, {name: jnp.zeros(shape, dtype) for name, (shape, _) in specs.items()},
                                                dtype=dtype))
    return nnx.split(module)


def restore_transformer(path: str | os.PathLike, *, dtype: str | jnp.dtype | None = None,
                        mesh: Mesh | None = None) -> tuple[Transformer, CalibrationResult | None]:
    """The Transformer of an orbax checkpoint folder (in `dtype`, default the saved one), laid
    out on `mesh` by the logical axis rules (default: the first device), and its statistics."""
    import orbax.checkpoint as ocp

    from triattention_jax import sharding

    path = Path(path)
    marker = read_marker(path)
    config, _ = read_hf_config(path)
    if mesh is not None:
        sharding.check_model_fits(config, mesh)
    dtype = jnp.dtype(dtype or marker["dtype"])
    graphdef, abstract = abstract_transformer(config, dtype)

    def placement(variable: nnx.Variable) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return sharding.variable_sharding(variable, mesh)

    target: dict[str, Any] = {"weights": {
        ".".join(map(str, key)): jax.ShapeDtypeStruct(variable.get_value().shape, variable.get_value().dtype,
                                                      sharding=placement(variable))
        for key, variable in nnx.to_flat_state(abstract)
    }}
    if marker["stats"] is not None:
        shape = (config.num_layers, config.num_heads, config.head_dim // 2)
        replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0])
        target["stats"] = {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated) for name in STATS_FIELDS}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore((path / STATE_DIR).resolve(), target)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot restore the orbax checkpoint {path} ({type(e).__name__}: {e}): save it again") from e
    weights = restored["weights"]
    state = nnx.from_flat_state([(key, variable.replace(weights[".".join(map(str, key))]))
                                 for key, variable in nnx.to_flat_state(abstract)])
    stats = None
    if marker["stats"] is not None:
        stats = CalibrationResult(stats=FrequencyStats(**restored["stats"]), metadata=marker["stats"])
    return nnx.merge(graphdef, state), stats


def timed_load(source: str, path: str, dtype: str, mesh_spec: str | None) -> float:
    """Seconds to get a model's weights onto the devices (on the mesh when given) from its
    safetensors folder (read, convert, place) or from an orbax checkpoint (restore into the
    shardings). Imports and the backend's start-up come first and are not counted."""
    import importlib

    from triattention_jax import sharding
    from triattention_jax.checkpoint import load_transformer

    importlib.import_module("orbax.checkpoint")
    mesh = sharding.make_mesh(mesh_spec) if mesh_spec else None
    jax.devices()
    start = time.perf_counter()
    if source == "orbax":
        transformer = restore_transformer(path, dtype=dtype, mesh=mesh)[0]
    else:
        transformer = load_transformer(Path(path), dtype=dtype)
        if mesh is not None:
            transformer = sharding.shard_transformer(transformer, mesh)
    jax.block_until_ready(jax.tree.leaves(nnx.state(transformer)))
    return time.perf_counter() - start


_CHILD = ("import json, sys; from triattention_jax.orbax_store import timed_load; "
          "print(json.dumps(timed_load(*json.loads(sys.argv[1]))))")


def time_reload(model: str, *, dtype: str, repeats: int, mesh: Mesh | None) -> dict[str, Any]:
    """Reload time of the model's weights: `timed_load` from its safetensors against from an
    orbax checkpoint of them, each load in a fresh process (a reload is a process's first
    load: nothing converted or compiled before it), the two alternating, so both read files
    the operating system has cached. The orbax checkpoint is written beside the model folder,
    on the same file system, and removed afterwards."""
    import subprocess

    from triattention_jax import sharding
    from triattention_jax.checkpoint import load_transformer, resolve_model_dir

    model_dir = resolve_model_dir(model)
    reference = load_transformer(model_dir, dtype=dtype)
    mesh_spec = sharding.format_mesh(mesh) if mesh is not None else None
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".orbax-reload-") as scratch:
        checkpoint = save_orbax(reference, model_dir, Path(scratch) / "orbax")
        paths = {"safetensors": str(model_dir), "orbax": str(checkpoint)}
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, path in paths.items():
                child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([name, path, dtype, mesh_spec])],
                                       capture_output=True, text=True)
                if child.returncode:
                    raise RuntimeError(f"timing a load from {name} failed:\n{child.stderr}")
                seconds[name].append(float(child.stdout.strip().splitlines()[-1]))
        orbax_bytes = sum(f.stat().st_size for f in (checkpoint / STATE_DIR).rglob("*") if f.is_file())
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(reference, nnx.Param)))
    safetensors_bytes = sum(f.stat().st_size for f in model_dir.glob("model*.safetensors"))
    rows = [{"source": name, "median_seconds": statistics.median(times), "min_seconds": min(times),
             "max_seconds": max(times), "weight_gb_per_second": weight_bytes / statistics.median(times) / 1e9,
             "file_bytes": orbax_bytes if name == "orbax" else safetensors_bytes}
            for name, times in seconds.items()]
    return {"model": str(model_dir), "dtype": dtype, "mesh": mesh_spec, "repeats": repeats, "weight_bytes": weight_bytes,
            "rows": rows, "seconds": seconds, "speedup": rows[0]["median_seconds"] / rows[1]["median_seconds"],
            "environment": _environment()}


def _environment() -> dict[str, Any]:
    import platform

    import flax
    import orbax.checkpoint as ocp

    return {"jax": jax.__version__, "flax": flax.__version__, "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
            "platform": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("model", embedded.DEFAULT_MODEL_NAME, "HF checkpoint folder, hub id, or a folder name under models/.")
    flags.DEFINE_string("out", None, "Write the orbax checkpoint folder here (must not exist yet).")
    flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Dtype of the saved weights.")
    flags.DEFINE_string("stats", None, "TriAttention statistics to include; default: the model folder's, when it has them.")
    flags.DEFINE_bool("time_reload", False, "Instead of saving: time restoring from orbax against converting the safetensors, "
                      "each load in a fresh process.")
    flags.DEFINE_integer("repeats", 5, "Timed loads of each kind with --time_reload.")
    flags.DEFINE_string("mesh", None, "With --time_reload: lay the weights out on this mesh, e.g. data=2,model=4 "
                        "(default: one device).")
    flags.DEFINE_string("json", None, "With --time_reload: write the measurements here as JSON.")


def main(argv: list[str]) -> None:
    from triattention_jax import sharding
    from triattention_jax.checkpoint import load_model
    from triattention_jax.prompts import check_writable, write_json_atomic
    from triattention_jax.stats import STATS_FILE, load_stats

    sharding.initialize_distributed()
    mesh = sharding.make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    if FLAGS.time_reload:
        if FLAGS.json:
            check_writable(FLAGS.json)
        if FLAGS.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {FLAGS.repeats}")
        result = time_reload(FLAGS.model, dtype=FLAGS.dtype, repeats=FLAGS.repeats, mesh=mesh)
        print(f"{result['model']} ({result['weight_bytes'] / 1e6:.0f} MB of {result['dtype']} weights), "
              f"mesh {result['mesh'] or 'one device'}, {result['repeats']} loads each, one process per load")
        print(f"{'source':>12} {'median s':>9} {'min s':>9} {'max s':>9} {'GB/s':>7} {'file MB':>8}")
        for row in result["rows"]:
            print(f"{row['source']:>12} {row['median_seconds']:9.3f} {row['min_seconds']:9.3f} {row['max_seconds']:9.3f} "
                  f"{row['weight_gb_per_second']:7.2f} {row['file_bytes'] / 1e6:8.0f}")
        print(f"orbax restore is {result['speedup']:.2f}x as fast as converting the safetensors")
        if FLAGS.json:
            write_json_atomic(FLAGS.json, result)
        return
    if not FLAGS.out:
        raise UserError("give --out (the orbax checkpoint folder to write) or --time_reload")
    loaded = load_model(FLAGS.model, dtype=FLAGS.dtype)
    stats_path = FLAGS.stats or (loaded.store_dir / STATS_FILE if (loaded.store_dir / STATS_FILE).exists() else None)
    stats = load_stats(stats_path, loaded.transformer) if stats_path else loaded.stats
    out = save_orbax(loaded.transformer, loaded.path, FLAGS.out, stats=stats)
    print(f"wrote {out} ({'with' if stats is not None else 'without'} TriAttention statistics)", file=sys.stderr)


if __name__ == "__main__":
    _define_flags()
    run_cli(main)
