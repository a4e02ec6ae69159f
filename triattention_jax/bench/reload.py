"""Reload time of a model's weights: converting its safetensors against restoring an orbax
checkpoint of them, each load in a fresh process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from triattention_jax import sharding
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.checkpoints.orbax import STATE_DIR, restore_transformer, save_orbax
from triattention_jax.checkpoints.store import resolve_model_dir


def timed_load(source: str, path: str, dtype: str, mesh_spec: str | None) -> float:
    """Seconds to get a model's weights onto the devices (on the mesh when given) from its
    safetensors folder (read, convert, place) or from an orbax checkpoint (restore into the
    shardings). Imports and the backend's start-up come first and are not counted."""
    import importlib

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


_CHILD = (
    "import json, sys; from triattention_jax.bench.reload import timed_load; "
    "print(json.dumps(timed_load(*json.loads(sys.argv[1]))))"
)


def time_reload(model: str, *, dtype: str, repeats: int, mesh: Mesh | None) -> dict[str, Any]:
    """Reload time of the model's weights: `timed_load` from its safetensors against from an
    orbax checkpoint of them, each load in a fresh process (a reload is a process's first
    load: nothing converted or compiled before it), the two alternating, so both read files
    the operating system has cached. The orbax checkpoint is written beside the model folder,
    on the same file system, and removed afterwards."""
    model_dir = resolve_model_dir(model)
    reference = load_transformer(model_dir, dtype=dtype)
    mesh_spec = sharding.format_mesh(mesh) if mesh is not None else None
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".orbax-reload-") as scratch:
        checkpoint = save_orbax(reference, model_dir, Path(scratch) / "orbax")
        paths = {"safetensors": str(model_dir), "orbax": str(checkpoint)}
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, path in paths.items():
                child = subprocess.run(
                    [sys.executable, "-c", _CHILD, json.dumps([name, path, dtype, mesh_spec])],
                    capture_output=True,
                    text=True,
                )
                if child.returncode:
                    raise RuntimeError(f"timing a load from {name} failed:\n{child.stderr}")
                seconds[name].append(float(child.stdout.strip().splitlines()[-1]))
        orbax_bytes = sum(f.stat().st_size for f in (checkpoint / STATE_DIR).rglob("*") if f.is_file())
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(reference, nnx.Param)))
    safetensors_bytes = sum(f.stat().st_size for f in model_dir.glob("model*.safetensors"))
    rows = [
        {
            "source": name,
            "median_seconds": statistics.median(times),
            "min_seconds": min(times),
            "max_seconds": max(times),
            "weight_gb_per_second": weight_bytes / statistics.median(times) / 1e9,
            "file_bytes": orbax_bytes if name == "orbax" else safetensors_bytes,
        }
        for name, times in seconds.items()
    ]
    return {
        "model": str(model_dir),
        "dtype": dtype,
        "mesh": mesh_spec,
        "repeats": repeats,
        "weight_bytes": weight_bytes,
        "rows": rows,
        "seconds": seconds,
        "speedup": rows[0]["median_seconds"] / rows[1]["median_seconds"],
        "environment": _environment(),
    }


def _environment() -> dict[str, Any]:
    import platform

    import flax
    import orbax.checkpoint as ocp

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
