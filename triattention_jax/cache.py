"""The fixed-size KV buffer: an explicit pytree that every step takes and returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp

from triattention_jax.config import ModelConfig
from triattention_jax.rope import Rotation

T = TypeVar("T")

EMPTY_POSITION = -1

# Logical axes of the cache's arrays, which `sharding` maps to mesh axes: rows over "data", KV
# heads over "model", layers and slots whole. A policy declares its own state's axes
# (`KVCache.with_state`); state it declares none for is left to XLA's sharding propagation.
ENTRY_AXES = ("batch", "kv_heads", "slots", "head_dim")
POSITION_AXES = ("batch", "kv_heads", "slots")
SLOT_STATS_AXES = ("layers", "batch", "kv_heads", "slots")

# A K-only layer's keys are slot-major, (batch, slots, kv_heads, head_dim): all heads' K of a
# slot are then one row of the values' matrix product (`model.key_only_block`). Laid out like
# the other layers, XLA transposed the whole layer's K for that product at every step (H100,
# Llama-2-7B layer, batch 8: 0.79 ms against 0.37 ms slot-major). As a permutation of
# (batch, kv_heads, slots, head_dim), its own inverse.
KEY_ONLY_LAYOUT = (0, 2, 1, 3)
KEY_ONLY_SLOT_AXIS = KEY_ONLY_LAYOUT.index(2)


def layer_by_layer(fn: Callable[..., T], *per_layer: Sequence) -> list[T]:
    """[fn(*args) for args in zip(*per_layer)], one layer after another: each layer's inputs
    pass an optimization barrier together with the previous layer's result, so XLA cannot
    schedule the layers side by side and hold every layer's scratch (e.g. float32 keys) at once."""
    results: list[T] = []
    for args in zip(*per_layer):
        if results:
            results[-1], args = jax.lax.optimization_barrier((results[-1], args))
        results.append(fn(*args))
    return results


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """K, V and the true position of every slot, one array per layer.

    Per layer (a separate array each, not stacked over layers: a decode loop then reads each
    layer's buffer in place, where XLA copies any slice it takes of a stacked one; measured on
    an H100, Qwen3-8B shape, batch 64, 2,176 slots: 28.8 ms per step stacked, 15.4 per layer):
    k[i], v[i]: (batch, kv_heads, slots, head_dim), post-RoPE keys and values. v[i] is None
            for a K-only (slim attention) layer: V is recomputed from all heads' K, so every
            head of that layer holds the same token in a slot (see `slim.py`), and its keys
            are cached before RoPE, rotated by `key_rotation` where attention or a policy
            reads them (`layers`): values then need no un-rotation. Its k[i] is slot-major:
            (batch, slots, kv_heads, head_dim) (`KEY_ONLY_LAYOUT`).
    pos[i]: (batch, kv_heads, slots) int32; EMPTY_POSITION marks an empty slot.
            Attention masks come from these positions, never from slot order, so an
            eviction policy may keep any subset of slots per head.
    cursor: () int32, the next slot written; the same for every layer, row and head, rows
            whose prompts are shorter simply hold empty slots.
    slot_stats: per-slot float32 statistics a policy keeps, each (layers, batch, kv_heads,
            slots); they move with their slots on compaction and start at 0 for new slots.
    state:  any other arrays a policy carries from step to step (e.g. recent queries).
    key_rotation: the model's RoPE when some layer is K-only, else None (static).
    state_axes: the logical axes of each state array the policy declared (static pairs).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array | None, ...]
    pos: tuple[jax.Array, ...]
    cursor: jax.Array
    slot_stats: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    state: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    key_rotation: Rotation | None = dataclasses.field(default=None, metadata={"static": True})
    state_axes: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(default=(), metadata={"static": True})

    @classmethod
    def from_stacked(
        cls, k: jax.Array, v: jax.Array | None, pos: jax.Array, cursor: jax.Array | int, **fields
    ) -> KVCache:
        """A cache from layer-stacked arrays: k, v (layers, batch, kv_heads, slots, head_dim) (v None:
        K only, laid out slot-major here), pos (layers, batch, kv_heads, slots)."""

        def split(x: jax.Array) -> tuple[jax.Array, ...]:
            return tuple(x[index] for index in range(x.shape[0]))

        keys = split(k) if v is not None else tuple(x.transpose(KEY_ONLY_LAYOUT) for x in split(k))
        return cls(
            k=keys,
            v=(None,) * k.shape[0] if v is None else split(v),
            pos=split(pos),
            cursor=jnp.asarray(cursor, jnp.int32),
            **fields,
        )

    def with_state(self, state: dict[str, jax.Array], axes: Mapping[str, tuple[str, ...]]) -> KVCache:
        """The cache carrying a policy's `state`, whose arrays have the logical `axes` given."""
        return dataclasses.replace(self, state=state, state_axes=tuple(sorted(axes.items())))

    def constrained(self, pin: Callable[[jax.Array, tuple[str, ...]], jax.Array]) -> KVCache:
        """The cache with `pin(array, logical_axes)` applied to each of its arrays (for sharding
        constraints); K-only layers' keys are slot-major, state without declared axes is left."""
        key_only_axes = tuple(ENTRY_AXES[axis] for axis in KEY_ONLY_LAYOUT)
        declared = dict(self.state_axes)
        return dataclasses.replace(
            self,
            k=tuple(
                pin(x, key_only_axes if key_only else ENTRY_AXES) for x, key_only in zip(self.k, self.key_only_layers)
            ),
            v=tuple(None if x is None else pin(x, ENTRY_AXES) for x in self.v),
            pos=tuple(pin(x, POSITION_AXES) for x in self.pos),
            cursor=pin(self.cursor, ()),
            slot_stats={name: pin(x, SLOT_STATS_AXES) for name, x in self.slot_stats.items()},
            state={name: pin(x, declared[name]) if name in declared else x for name, x in self.state.items()},
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_slots(self) -> int:
        return self.pos[0].shape[2]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k[0].dtype

    @property
    def key_only_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it holds K only (V recomputed; every head keeps the same tokens)."""
        return tuple(v is None for v in self.v)

    def layers(self) -> tuple[CacheLayer, ...]:
        """Each layer's k, v and pos, with the rotation its keys still need (K-only layers)."""
        if any(self.key_only_layers) and self.key_rotation is None:
            raise ValueError("a cache with K-only layers needs key_rotation: their keys are cached before RoPE")
        return tuple(
            CacheLayer(k=k, v=v, pos=pos, rotation=self.key_rotation if v is None else None)
            for k, v, pos in zip(self.k, self.v, self.pos)
        )

    def stacked(self, name: str) -> jax.Array:
        """ "k", "v" or "pos" stacked over layers (a copy): (layers, batch, kv_heads, slots[, head_dim]),
        but K-only layers' keys slot-major; "v" needs every layer to hold V, "k" layers alike."""
        return jnp.stack(getattr(self, name))

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffer: K, V, positions and whatever the policy keeps."""
        return int(sum(leaf.nbytes for leaf in jax.tree.leaves(self)) - self.cursor.nbytes)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the K/V entries alone (no positions or statistics): a K-only cache holds
        exactly half of what a standard one of the same shape does."""
        return int(sum(leaf.nbytes for leaf in jax.tree.leaves((self.k, self.v))))

    def _map_layers(self, fn, *per_layer: Sequence) -> dict[str, tuple[jax.Array, ...] | None]:
        """k, v (when present) and pos through fn(entry array, its slot axis, is_pos, *per-layer
        args), one layer after another (`layer_by_layer`)."""

        def one_layer(arrays: tuple[jax.Array | None, ...], *args) -> tuple[jax.Array | None, ...]:
            k, v, pos = arrays
            return (
                fn(k, 2 if v is not None else KEY_ONLY_SLOT_AXIS, False, *args),
                None if v is None else fn(v, 2, False, *args),
                fn(pos, 2, True, *args),
            )

        layers = layer_by_layer(one_layer, list(zip(self.k, self.v, self.pos)), *per_layer)
        return {name: tuple(layer[i] for layer in layers) for i, name in enumerate(("k", "v", "pos"))}

    def append(self, k: Sequence[jax.Array], v: Sequence[jax.Array] | None, pos: jax.Array) -> KVCache:
        """Writes T new entries at slots [cursor, cursor + T) of every layer.

        k, v: per layer (batch, kv_heads, T, head_dim), but a K-only layer's keys slot-major, (batch,
        T, kv_heads, head_dim), as `ExtendOutput` gives them (v's entries for K-only layers are
        ignored); pos: (batch, T), broadcast to every layer and head.
        """
        zero = jnp.zeros((), jnp.int32)
        T = pos.shape[1]
        pos = jnp.broadcast_to(pos[:, None, :], (*self.pos[0].shape[:2], T)).astype(jnp.int32)

        def write(buffer: jax.Array, new: jax.Array, slot_axis: int = 2) -> jax.Array:
            start = tuple(self.cursor if axis == slot_axis else zero for axis in range(buffer.ndim))
            return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)

        fresh = jnp.zeros((self.num_layers, *pos.shape), jnp.float32)
        return dataclasses.replace(
            self,
            k=tuple(
                write(x, k[i], KEY_ONLY_SLOT_AXIS if key_only else 2)
                for i, (x, key_only) in enumerate(zip(self.k, self.key_only_layers))
            ),
            v=tuple(None if x is None else write(x, v[i]) for i, x in enumerate(self.v)),
            pos=tuple(write(x, pos) for x in self.pos),
            cursor=self.cursor + T,
            slot_stats={
                name: jax.lax.dynamic_update_slice(x, fresh, (zero, zero, zero, self.cursor))
                for name, x in self.slot_stats.items()
            },
        )

    def resized(self, num_slots: int) -> KVCache:
        """The same entries in a buffer of `num_slots` slots (padding with empty slots)."""
        extra = num_slots - self.num_slots
        if extra < 0:
            raise ValueError(f"cannot shrink a cache of {self.num_slots} slots to {num_slots}; compact it first")

        def grow(x: jax.Array, slot_axis: int, is_pos: bool) -> jax.Array:
            pad = [(0, extra if axis == slot_axis else 0) for axis in range(x.ndim)]
            return jnp.pad(x, pad, constant_values=EMPTY_POSITION if is_pos else 0)

        return dataclasses.replace(
            self, **self._map_layers(grow), slot_stats={name: grow(x, 3, False) for name, x in self.slot_stats.items()}
        )

    def gather(self, slots: jax.Array, *, in_place: bool = False) -> KVCache:
        """Keeps the given slots, in the given order: slots is (layers, batch, kv_heads, keep).

        The cursor ends up at `keep`. By default the result has `keep` slots. With in_place,
        it keeps this buffer's size: the kept entries are written over its first `keep` slots
        and the rest are marked empty, so a donated buffer is updated in place, layer by
        layer, and a compaction's scratch is one layer's kept entries, not a second buffer.
        """
        keep = slots.shape[-1]
        zero = jnp.zeros((), jnp.int32)

        def take(x: jax.Array, slot_axis: int, is_pos: bool, layer_slots: jax.Array) -> jax.Array:
            if slot_axis != layer_slots.ndim - 1:  # a K-only layer's slot-major keys
                layer_slots = layer_slots.transpose(KEY_ONLY_LAYOUT[:3])
            kept = jnp.take_along_axis(
                x, layer_slots.reshape(layer_slots.shape + (1,) * (x.ndim - layer_slots.ndim)), axis=slot_axis
            )
            if not in_place:
                return kept
            if is_pos:
                x = jnp.full_like(x, EMPTY_POSITION)
            return jax.lax.dynamic_update_slice(x, kept, (zero,) * x.ndim)

        return dataclasses.replace(
            self,
            **self._map_layers(take, slots),
            cursor=jnp.asarray(keep, jnp.int32),
            slot_stats={name: take(x, 3, False, slots) for name, x in self.slot_stats.items()},
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheLayer:
    """One layer of a `KVCache` (k, v, pos as there); rotation (static) is set exactly when the
    layer is K-only, its keys cached before RoPE."""

    k: jax.Array
    v: jax.Array | None
    pos: jax.Array
    rotation: Rotation | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def rope_keys(self) -> jax.Array:
        """(batch, kv_heads, slots, head_dim) keys as attention sees them: as cached, or, in a
        K-only layer, rotated here (float32)."""
        if self.rotation is None:
            return self.k
        return self.slot_major_rope_keys(self.k).transpose(KEY_ONLY_LAYOUT)

    def slot_major_rope_keys(self, keys: jax.Array) -> jax.Array:
        """A K-only layer's keys (this layer's k, or the same array with a layout pinned) rotated,
        float32, slot-major: every head holds the slot's token, so one angle per slot."""
        return self.rotation.apply(keys, self.pos[:, 0, :, None])


def init_cache(
    config: ModelConfig, batch: int, num_slots: int, dtype: jnp.dtype, *, values: bool | Sequence[bool] = True
) -> KVCache:
    """An empty cache with `num_slots` slots per (layer, row, KV head); `values` says, for all
    layers or per layer, which hold V (the others hold K only)."""
    shape = (batch, config.num_kv_heads, num_slots, config.head_dim)
    layers = range(config.num_layers)
    values = [values] * config.num_layers if isinstance(values, bool) else list(values)
    return KVCache(
        k=tuple(
            jnp.zeros(shape if has_values else tuple(shape[axis] for axis in KEY_ONLY_LAYOUT), dtype)
            for has_values in values
        ),
        v=tuple(jnp.zeros(shape, dtype) if has_values else None for has_values in values),
        pos=tuple(jnp.full(shape[:-1], EMPTY_POSITION, jnp.int32) for _ in layers),
        cursor=jnp.zeros((), jnp.int32),
        key_rotation=None if all(values) else Rotation.of(config.rope, config.head_dim),
    )


def cache_nbytes(
    config: ModelConfig, batch: int, num_slots: int, dtype: jnp.dtype, *, values: bool | Sequence[bool] = True
) -> int:
    """What `init_cache(..., values=values).nbytes` would be, without allocating."""
    values = [values] * config.num_layers if isinstance(values, bool) else list(values)
    per_layer = batch * config.num_kv_heads * num_slots
    entry = config.head_dim * jnp.dtype(dtype).itemsize
    return sum(per_layer * ((2 if has_values else 1) * entry + 4) for has_values in values)
