"""Decoding on a device mesh: data parallelism over the batch, tensor parallelism over heads
and the MLP, the KV cache sharded by batch and KV heads.

A mesh has two axes, "data" and "model", given as a spec string such as "data=2,model=4"
(`make_mesh`). Every weight carries logical axis names (`model.weight_specs`);
`LOGICAL_AXIS_RULES` maps them to mesh axes, so placing a model is one `device_put` per
weight (`shard_transformer`). The cache follows the same rules (`constrain_cache`): batch over
"data", KV heads over "model", layers and slots whole. Eviction scores every slot of a
(layer, row, KV head) where that head lives, and per_head's mean over layers stays on the
shard too; K and V never move. Only per_layer aggregation communicates (a max over KV heads,
an all-reduce of layers × rows × slots scores). The selection is a stable sort of the scores
(`EvictionPolicy.compact`), which XLA partitions; `lax.top_k`, which it does not (Shardy or
GSPMD, jax 0.10.2 and 0.11.2), all-gathered the float32 scores and selected on every device.

Multi-host: `initialize_distributed` starts `jax.distributed` when the launch environment
says there are several processes; every process then runs the same program over the global
mesh, and host-side reads go through `to_host`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from triattention_jax.cache import KVCache, cache_nbytes
from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError
from triattention_jax.model import Pin, Transformer, weight_specs

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (None: replicated). Heads and the MLP hidden size are split for
# tensor parallelism; the vocabulary too, so the embedding table and the LM head (the
# largest single weights of small models) are split rather than copied to every device.
# "layers" stays whole: per_head aggregation averages over layers, which is local only if
# no shard holds a subset of layers.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "batch": "data",
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "embed": None,
    "head_dim": None,
    "layers": None,
    "slots": None,
    "window": None,
    "value_heads": None,
    "key_features": "model",
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """ "data=2,model=4" -> {"data": 2, "model": 4}; an axis left out has size 1."""
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise UserError(f"--mesh {spec!r}: expected comma-separated axis=size entries, e.g. data=2,model=4")
        if name not in MESH_AXES:
            raise UserError(f"--mesh {spec!r}: unknown axis {name!r}; the axes are {' and '.join(MESH_AXES)}")
        if name in sizes:
            raise UserError(f"--mesh {spec!r}: axis {name!r} is given twice; give each axis once")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise UserError(f"--mesh {spec!r}: the size of {name!r} must be a positive integer, got {value!r}")
        sizes[name] = size
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int], devices: list[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over the first data × model devices (all of them across hosts).

    The axis types are Auto: XLA propagates shardings from the weights, the cache and the
    inputs, so the model code needs no per-operation annotations.
    """
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes.values())
    described = format_mesh(sizes)
    if needed > len(devices):
        raise UserError(
            f"--mesh {described} needs {needed} devices, more than the {len(devices)} JAX sees: "
            f"choose axis sizes whose product divides {len(devices)}"
        )
    if len(devices) % needed:
        raise UserError(
            f"--mesh {described} needs {needed} devices, which does not divide the {len(devices)} devices JAX sees: "
            f"choose axis sizes whose product divides {len(devices)}"
        )
    if jax.process_count() > 1 and needed != len(devices):
        raise UserError(
            f"--mesh {described} covers {needed} of the {len(devices)} devices of this {jax.process_count()}-process "
            f"run: a multi-host mesh must use every device (data × model = {len(devices)})"
        )
    return jax.make_mesh(
        tuple(sizes[axis] for axis in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices[:needed],
    )


def format_mesh(mesh: Mesh | Mapping[str, int]) -> str:
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else mesh
    return ",".join(f"{axis}={sizes[axis]}" for axis in MESH_AXES)


def _model_axis_problem(config: ModelConfig, model: int) -> tuple[str, int] | None:
    """(what, size) of the first of the model's KV heads, query heads and MLP hidden units that
    a model axis of this size does not divide; None when it divides them all."""
    for what, size in (
        ("KV heads", config.num_kv_heads),
        ("query heads", config.num_heads),
        ("MLP hidden units", config.intermediate_size),
    ):
        if size % model:
            return what, size
    return None


def check_model_fits(config: ModelConfig, mesh: Mesh) -> None:
    """Refuses a model axis that does not divide the KV heads, the query heads or the MLP
    hidden size (the vocabulary is replicated instead when it does not divide it).

    KV heads are refused rather than replicated over the model axis: with replicated KV
    heads XLA lays the appended entries out like the query heads and all-gathers every
    layer's whole K and V in each decode step to put them back (seen in the compiled HLO of
    a round on 8 CPU devices, 4 KV heads, model axis 8), which costs far more than it saves.
    """
    model = mesh.shape["model"]
    problem = _model_axis_problem(config, model)
    if problem is not None:
        what, size = problem
        fits = [m for m in range(1, jax.device_count() + 1) if size % m == 0 and jax.device_count() % m == 0]
        raise UserError(
            f"the mesh's model axis of {model} does not divide the model's {size} {what}: "
            f"use a model axis that divides {size} and the device count (here: {', '.join(map(str, fits))})"
        )


def device_weight_bytes(config: ModelConfig, dtype: Any, sizes: Mapping[str, int]) -> int:
    """The weights' bytes one device holds on a mesh of these axis sizes (as `shard_transformer`
    would place them), from the config alone."""
    total = 0
    for shape, axes in weight_specs(config).values():
        elements = math.prod(shape)
        for name, size in zip(axes, shape):
            if _mesh_axis(name, size, sizes) is not None:
                elements //= sizes[LOGICAL_AXIS_RULES[name]]
        total += elements * jnp.dtype(dtype).itemsize
    return total


def choose_mesh(
    config: ModelConfig,
    dtype: Any,
    *,
    devices: int,
    batches: Sequence[int],
    num_slots: int,
    memory_bytes: int | None,
    reserve: float = 0.1,
) -> dict[str, int]:
    """A data × model mesh for throughput over as many of `devices` as the model and batch
    allow: the most data parallel split whose share fits one device, weights
    (`device_weight_bytes`) plus the rows of the largest batch that land on it (at least one)
    with their K/V buffer of num_slots, within (1 − reserve) of memory_bytes (None: not
    checked). Replicas need no collectives per step, so they come first; tensor parallelism
    takes over where the weights or the rows do not fit, and where the data axis cannot split
    the batch (one row: latency). The model axis must divide the KV heads, query heads and MLP
    (`check_model_fits`), the data axis every batch; the device count used divides `devices`."""
    smallest: tuple[int, dict[str, int]] | None = None
    splits = [(n // m, m) for n in range(devices, 0, -1) if devices % n == 0 for m in range(1, n + 1) if n % m == 0]
    for data, model in splits:
        if _model_axis_problem(config, model) or any(batch % data for batch in batches):
            continue
        sizes = {"data": data, "model": model}
        rows = max(1, max(batches, default=1) // data)
        need = device_weight_bytes(config, dtype, sizes) + rows * cache_nbytes(config, 1, num_slots, dtype) // model
        if memory_bytes is None or need <= (1 - reserve) * memory_bytes:
            return sizes
        if smallest is None or need < smallest[0]:
            smallest = (need, sizes)
    need, sizes = smallest
    raise UserError(
        f"no mesh of {devices} devices fits {(1 - reserve) * memory_bytes / 2**30:.3g} GiB per device: the smallest "
        f"share, {format_mesh(sizes)}, needs {need / 2**30:.3g} GiB; lower the number of prompts, --max_new_tokens "
        "or --budget, or use more devices"
    )


def check_batch(batch: int, mesh: Mesh) -> None:
    """Refuses a batch that the data axis does not divide (rows are split evenly over it)."""
    data = mesh.shape["data"]
    if batch % data:
        raise UserError(
            f"a batch of {batch} rows does not split over the mesh's data axis of {data}: "
            f"give a multiple of {data} prompts or a smaller data axis"
        )


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes: each mapped axis is sharded when
    its mesh axis (of size > 1) divides the dimension, else replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the shape {shape}")
    return PartitionSpec(*(_mesh_axis(name, size, mesh.shape) for name, size in zip(axes, shape)))


def _mesh_axis(name: str | None, size: int, sizes: Mapping[str, int]) -> str | None:
    """The mesh axis a dimension of this logical name and size is split over: its rule's,
    when that axis has more than one device and divides the size; else (and for no name)
    None, replicated."""
    if name is None:
        return None
    if name not in LOGICAL_AXIS_RULES:
        raise ValueError(f"no sharding rule for logical axis {name!r}")
    mesh_axis = LOGICAL_AXIS_RULES[name]
    return mesh_axis if mesh_axis is not None and sizes[mesh_axis] > 1 and size % sizes[mesh_axis] == 0 else None


def logical_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """From the variable's `logical_axes` metadata; variables without them (RoPE frequencies)
    are replicated."""
    axes = variable.get_metadata().get("logical_axes")
    shape = tuple(variable.get_value().shape)
    return NamedSharding(mesh, logical_spec(tuple(axes), shape, mesh) if axes is not None else PartitionSpec())


def place(value: Any, sharding: NamedSharding) -> jax.Array:
    """An array laid out as `sharding`. On one host a device-to-device `device_put`; across
    hosts each process builds its own shards from the (identical) host value."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The state with every array placed by the logical axis rules (no copy for arrays that
    already have their sharding)."""
    return jax.tree.map(
        lambda variable: variable.replace(_placed(variable.get_value(), variable_sharding(variable, mesh))),
        state,
        is_leaf=_is_variable,
    )


def _placed(value: jax.Array, sharding: NamedSharding) -> jax.Array:
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    return place(value, sharding)


def shard_transformer(transformer: Transformer, mesh: Mesh) -> Transformer:
    """A Transformer whose weights are laid out on the mesh (checked to fit it first)."""
    check_model_fits(transformer.config, mesh)
    graphdef, state = nnx.split(transformer)
    return nnx.merge(graphdef, shard_state(state, mesh))


def pinner(mesh: Mesh) -> Pin:
    """`model.Pin` on this mesh: a sharding constraint by the logical axis rules."""
    return lambda x, axes: jax.lax.with_sharding_constraint(x, logical_sharding(axes, x.shape, mesh))


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """The cache with its sharding pinned inside a jitted function (identity without a mesh),
    by the logical axes the cache declares for its arrays."""
    if mesh is None:
        return cache
    return cache.constrained(pinner(mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over the data axis, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def put_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array whose leading axis is the batch, split over the data axis."""
    return place(np.asarray(array), batch_sharding(mesh, np.ndim(array)))


def to_host(x: jax.Array) -> np.ndarray:
    """A device array's whole value on this host, also when other hosts hold some of its shards."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# Launch environments that say this process is one of several.
_MULTI_PROCESS_ENV = (("SLURM_NTASKS", "slurm"), ("OMPI_COMM_WORLD_SIZE", "ompi"))


def initialize_distributed() -> bool:
    """Starts `jax.distributed` when launched as one of several processes; True if it did.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every process. Otherwise Slurm (SLURM_NTASKS > 1) and Open MPI
    (OMPI_COMM_WORLD_SIZE > 1) are detected by JAX itself. Call before any JAX computation.
    """
    if jax.distributed.is_initialized():
        return True
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise UserError(
                f"JAX_COORDINATOR_ADDRESS={address} is set, so this is a multi-host launch: also set JAX_NUM_PROCESSES "
                "and JAX_PROCESS_ID (integers) on every process"
            ) from e
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
        return True
    for variable, method in _MULTI_PROCESS_ENV:
        if int(os.environ.get(variable, "1") or "1") > 1:
            jax.distributed.initialize(cluster_detection_method=method)
            return True
    return False
