"""The fixed-size KV buffer: an explicit pytree that every step takes and returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from triattention_jax.config import ModelConfig

EMPTY_POSITION = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """K, V and the true position of every slot, per (layer, batch row, KV head).

    k, v:   (layers, batch, kv_heads, slots, head_dim), post-RoPE keys and values. v is None
            in a K-only (slim attention) cache: V is recomputed from all heads' K, so every
            head of a layer holds the same token in a slot (see `slim.py`).
    pos:    (layers, batch, kv_heads, slots) int32; EMPTY_POSITION marks an empty slot.
            Attention masks come from these positions, never from slot order, so an
            eviction policy may keep any subset of slots per head.
    cursor: () int32, the next slot written; the same for every row and head, rows whose
            prompts are shorter simply hold empty slots.
    slot_stats: per-slot float32 statistics a policy keeps, each (layers, batch, kv_heads,
            slots); they move with their slots on compaction and start at 0 for new slots.
    state:  any other arrays a policy carries from step to step (e.g. recent queries).
    """

    k: jax.Array
    v: jax.Array | None
    pos: jax.Array
    cursor: jax.Array
    slot_stats: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    state: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffer: K, V, positions and whatever the policy keeps."""
        return int(sum(leaf.nbytes for leaf in jax.tree.leaves(self)) - self.cursor.nbytes)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the K/V entries alone (no positions or statistics): a K-only cache holds
        exactly half of what a standard one of the same shape does."""
        return int(self.k.nbytes + (0 if self.v is None else self.v.nbytes))

    def _map_entries(self, fn) -> dict[str, jax.Array | None]:
        """k and v (when present) through the same per-entry function."""
        return {"k": fn(self.k), "v": None if self.v is None else fn(self.v)}

    def append(self, k: jax.Array, v: jax.Array, pos: jax.Array) -> "KVCache":
        """Writes T new entries at slots [cursor, cursor + T).

        k, v: (layers, batch, kv_heads, T, head_dim); pos: (batch, T), broadcast to every
        layer and head.
        """
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, zero, self.cursor, zero)
        pos = jnp.broadcast_to(pos[None, :, None, :], k.shape[:-1]).astype(jnp.int32)
        fresh = jnp.zeros(k.shape[:-1], jnp.float32)
        new = {"k": k, "v": v}
        return dataclasses.replace(
            self,
            **{name: None if buffer is None else jax.lax.dynamic_update_slice(buffer, new[name].astype(buffer.dtype), start)
               for name, buffer in (("k", self.k), ("v", self.v))},
            pos=jax.lax.dynamic_update_slice(self.pos, pos, start[:-1]),
            cursor=self.cursor + k.shape[3],
            slot_stats={name: jax.lax.dynamic_update_slice(x, fresh, start[:-1]) for name, x in self.slot_stats.items()},
        )

    def resized(self, num_slots: int) -> "KVCache":
        """The same entries in a buffer of `num_slots` slots (padding with empty slots)."""
        extra = num_slots - self.num_slots
        if extra < 0:
            raise ValueError(f"cannot shrink a cache of {self.num_slots} slots to {num_slots}; compact it first")
        pad = [(0, 0)] * 3 + [(0, extra)]
        return dataclasses.replace(
            self,
            **self._map_entries(lambda x: jnp.pad(x, pad + [(0, 0)])),
            pos=jnp.pad(self.pos, pad, constant_values=EMPTY_POSITION),
            slot_stats={name: jnp.pad(x, pad) for name, x in self.slot_stats.items()},
        )

    def gather(self, slots: jax.Array) -> "KVCache":
        """Keeps the given slots, in the given order: slots is (layers, batch, kv_heads, keep).

        The result has `keep` slots and its cursor at the end.
        """
        return dataclasses.replace(
            self,
            **self._map_entries(lambda x: jnp.take_along_axis(x, slots[..., None], axis=3)),
            pos=jnp.take_along_axis(self.pos, slots, axis=3),
            cursor=jnp.asarray(slots.shape[-1], jnp.int32),
            slot_stats={name: jnp.take_along_axis(x, slots, axis=3) for name, x in self.slot_stats.items()},
        )


def init_cache(config: ModelConfig, batch: int, num_slots: int, dtype: jnp.dtype, *, values: bool = True) -> KVCache:
    """An empty cache with `num_slots` slots per (layer, row, KV head); K only unless `values`."""
    shape = (config.num_layers, batch, config.num_kv_heads, num_slots, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype) if values else None,
        pos=jnp.full(shape[:-1], EMPTY_POSITION, jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
    )


def cache_nbytes(config: ModelConfig, batch: int, num_slots: int, dtype: jnp.dtype, *, values: bool = True) -> int:
    """What `init_cache(..., values=values).nbytes` would be, without allocating."""
    entries = config.num_layers * batch * config.num_kv_heads * num_slots
    return entries * ((2 if values else 1) * config.head_dim * jnp.dtype(dtype).itemsize + 4)
