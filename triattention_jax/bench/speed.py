"""Steady-state decode timing on whatever device JAX has: what `benchmark.py` reports.

A decode round (`divide_length` steps in one jitted `lax.scan`, eviction included) is timed on
a buffer in the exact state it has in the middle of a long generation: `filled` slots in use
(full attention: a buffer of the size it grows to; eviction methods: their fixed buffer, full,
so the round starts with a compaction as every steady round does). Only K, V and positions are
synthetic; the policy's own statistics and state come from a real prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from triattention_jax import sharding
from triattention_jax.cache import EMPTY_POSITION, KVCache
from triattention_jax.decoding import (
    DecodeState,
    buffer_schedule,
    decode_round,
    prefill,
    prompt_bucket,
    put_rows,
    split_model,
)
from triattention_jax.model import Transformer
from triattention_jax.policies import EvictionPolicy, KVPolicy
from triattention_jax.sampling import Sampler

SYNTHETIC_PROMPT = 64
# The batches whose compiled rounds give the scratch per sequence and the fixed scratch.
MEMORY_BATCHES = (2, 4)


def copy_bandwidth(nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes per second (read + written) of a large device-to-device copy: the roofline.
    Default size: 2 GiB on accelerators, 128 MiB on the CPU (beyond its caches either way)."""
    nbytes = nbytes or (1 << 27 if jax.default_backend() == "cpu" else 1 << 31)
    x = jnp.arange(nbytes // 2, dtype=jnp.int32).astype(jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / float(np.median(times))


def weight_bytes(transformer: Transformer) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(transformer, nnx.Param)))


def device_bytes(tree) -> int:
    """Bytes of the tree's arrays held by one device (the first local one): all of them without
    a mesh; on a mesh, that device's shards, which is what its memory streams per step."""
    device = jax.local_devices()[0]
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(tree)
        if device in leaf.sharding.device_set
    )


@functools.partial(jax.jit, static_argnums=1, static_argnames=("mesh",))
def _synthetic_buffer(
    prompt_cache: KVCache, slots: int, pattern: jax.Array, filled: jax.Array, mesh: Mesh | None = None
) -> KVCache:
    """The prefilled cache's policy statistics in a buffer of `slots` slots whose first
    `filled` hold synthetic keys and values; built in one program, so the device holds one
    buffer, not a padded copy and a filled copy."""
    cache = prompt_cache.resized(slots)  # for its slot_stats and state: XLA drops the padded K/V
    positions = jnp.arange(slots, dtype=jnp.int32)

    def entries(layer_pattern: jax.Array, slot_major: bool, shape: tuple[int, ...]) -> jax.Array:
        return jnp.broadcast_to(layer_pattern[:, None] if slot_major else layer_pattern, shape).astype(cache.dtype)

    keys = tuple(entries(p, key_only, k.shape) for p, key_only, k in zip(pattern, cache.key_only_layers, cache.k))
    return sharding.constrain_cache(
        dataclasses.replace(
            cache,
            k=keys,
            v=tuple(None if v is None else -k for k, v in zip(keys, cache.v)),
            cursor=filled,
            pos=tuple(
                jnp.broadcast_to(jnp.where(positions < filled, positions, EMPTY_POSITION), x.shape) for x in cache.pos
            ),
        ),
        mesh,
    )


@dataclasses.dataclass(frozen=True)
class RoundSetup:
    """Everything a timed round takes, for one (policy, batch, buffer) shape."""

    graphdef: nnx.GraphDef
    state: nnx.State
    policy: KVPolicy
    cache: KVCache
    decode: DecodeState
    prompt_lengths: jax.Array
    mesh: Mesh | None = None

    def round_arguments(self, cache: KVCache, divide_length: int) -> tuple[tuple, dict]:
        """`decode_round`'s arguments for a greedy round of this shape over `cache`, EOS never matching."""
        args = (
            self.graphdef,
            self.state,
            self.policy,
            cache,
            self.decode,
            self.prompt_lengths,
            jax.random.key(0),
            jnp.asarray([-2], jnp.int32),
        )
        return args, {"sampler": Sampler(), "divide_length": divide_length, "mesh": self.mesh}


def steady_round(
    transformer: Transformer,
    policy: KVPolicy,
    *,
    batch: int,
    slots: int,
    filled: int,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> RoundSetup:
    """A buffer of `slots` slots with `filled` in use (positions 0..filled-1) and the policy's
    statistics and state set up by a real prefill of random tokens; on `mesh` when given."""
    config = transformer.config
    graphdef, state = split_model(transformer, mesh)
    rng = np.random.default_rng(seed)
    tokens, lengths = put_rows(
        mesh,
        rng.integers(0, config.vocab_size, (batch, prompt_bucket(SYNTHETIC_PROMPT))).astype(np.int32),
        np.full((batch,), SYNTHETIC_PROMPT, np.int32),
    )
    # A prompt-sized buffer: the synthetic one is the only full-size buffer the device holds.
    _, prompt_cache = prefill(graphdef, state, policy, tokens, lengths, num_slots=tokens.shape[1], mesh=mesh)
    pattern = jax.random.normal(jax.random.key(seed), (config.num_layers, slots, config.head_dim), jnp.float32)
    cache = _synthetic_buffer(prompt_cache, slots, pattern, jnp.asarray(filled, jnp.int32), mesh=mesh)
    token, position, done = put_rows(
        mesh,
        rng.integers(0, config.vocab_size, batch).astype(np.int32),
        np.full((batch,), filled, np.int32),
        np.zeros(batch, bool),
    )
    decode = DecodeState(token=token, position=position, done=done, step=jnp.zeros((), jnp.int32))
    return RoundSetup(graphdef, state, policy, cache, decode, lengths, mesh)


def time_rounds(setup: RoundSetup, divide_length: int, cursors: list[int], repeats: int = 5) -> list[float]:
    """Median seconds of one round started at each cursor (reset before every round, so each
    round starts from the same buffer state)."""
    cache = setup.cache
    medians = []
    for cursor in cursors:
        times = []
        for index in range(repeats + 1):
            cache = dataclasses.replace(cache, cursor=jnp.asarray(cursor, jnp.int32))
            jax.block_until_ready(cache)
            start = time.perf_counter()
            args, options = setup.round_arguments(cache, divide_length)
            cache, _, emitted = decode_round(*args, **options)
            jax.block_until_ready(emitted)
            if index:  # the first call may compile
                times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)))
    return medians


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTime:
    """One steady decode step: `slots` buffer slots, `filled` of them in use."""

    method: str
    batch: int
    slots: int
    filled: int
    step_seconds: float
    bytes_per_step: int
    eviction_share: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.step_seconds


def measure_step(
    transformer: Transformer,
    policy: KVPolicy,
    method: str,
    *,
    batch: int,
    slots: int,
    divide_length: int,
    mesh: Mesh | None = None,
) -> StepTime:
    """A steady step on a buffer of `slots` slots. Full attention: all slots but one round's in
    use; eviction policies: the buffer full, so the round compacts first, and the share of the
    round spent compacting, from the same round started with room (no compaction). Bytes per
    step are one device's (its weight shards, its rows' and heads' K, V and positions)."""
    evicts = isinstance(policy, EvictionPolicy)
    filled = slots if evicts else slots - divide_length
    setup = steady_round(transformer, policy, batch=batch, slots=slots, filled=filled, mesh=mesh)
    cursors = [filled, policy.budget] if evicts else [filled]
    times = time_rounds(setup, divide_length, cursors)
    bytes_per_step = device_bytes(nnx.state(nnx.merge(setup.graphdef, setup.state), nnx.Param)) + device_bytes(
        (setup.cache.k, setup.cache.v, setup.cache.pos)
    )
    return StepTime(
        method=method,
        batch=batch,
        slots=slots,
        filled=filled,
        step_seconds=times[0] / divide_length,
        bytes_per_step=bytes_per_step,
        eviction_share=max(0.0, 1 - times[1] / times[0]) if evicts else None,
    )


def integrated_seconds(step_seconds: Callable[[int], float], schedule: list[int], divide_length: int) -> float:
    """Decode seconds of a generation from the steady step time at each round's buffer size."""
    return sum(divide_length * step_seconds(slots) for slots in schedule)


def linear_fit(points: list[tuple[int, float]]) -> Callable[[int], float]:
    """Step time against buffer slots (weights are read once per step, each slot once):
    least squares a + b * slots through the measured points."""
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    if len(points) == 1:
        return lambda slots: float(ys[0])
    slope, intercept = np.polyfit(xs, ys, 1)
    return lambda slots: float(intercept + slope * slots)


def device_memory() -> tuple[int | None, int | None]:
    """(bytes JAX may use on the device, peak bytes in use so far); None where not reported."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit"), stats.get("peak_bytes_in_use")


def round_temp_bytes(setup: RoundSetup, divide_length: int) -> int:
    """Scratch memory XLA reserves for one round of this shape (0 where not reported)."""
    args, options = setup.round_arguments(setup.cache, divide_length)
    compiled = decode_round.lower(*args, **options).compile()
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0)


@dataclasses.dataclass(frozen=True)
class SequenceMemory:
    """Device bytes of a generation beyond the weights: per sequence, the buffer (policy
    statistics included, plus for a growing buffer the previous size, held while the next is
    filled) and the round's scratch memory (compaction gathers into new arrays, scoring works
    in float32); once per batch, the scratch that does not grow with it (logits, norms)."""

    buffer: int
    scratch: int
    fixed_scratch: int


def sequence_memory(
    transformer: Transformer, policy: KVPolicy, prompt_tokens: int, new_tokens: int, divide_length: int
) -> SequenceMemory:
    """Measured from the compiled round at the run's largest buffer, at batch 2 and 4 (XLA may
    compile batch 1 differently: an H100 Qwen3-8B round reserved 579 MiB at batch 1, 28 at 2)."""
    schedule = buffer_schedule(policy, prompt_tokens, new_tokens, divide_length)
    temps = []
    for batch in MEMORY_BATCHES:
        setup = steady_round(transformer, policy, batch=batch, slots=schedule[-1], filled=1)
        temps.append(round_temp_bytes(setup, divide_length))
    small, large = MEMORY_BATCHES
    per_slot = setup.cache.nbytes / (large * schedule[-1])
    previous = max([s for s in schedule if s < schedule[-1]], default=0)
    per_sequence = max(0, (temps[1] - temps[0]) // (large - small))
    return SequenceMemory(
        buffer=int(per_slot * (schedule[-1] + previous)),
        scratch=per_sequence,
        fixed_scratch=max(0, temps[0] - small * per_sequence),
    )


def largest_batch(memory_bytes: int, weights: int, memory: SequenceMemory, reserve: float = 0.1) -> int:
    """Rows that fit when `reserve` of the memory is left free (allocator slack)."""
    free = memory_bytes * (1 - reserve) - weights - memory.fixed_scratch
    return max(0, int(free // (memory.buffer + memory.scratch)))


def end_to_end(
    transformer: Transformer,
    policy: KVPolicy,
    *,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    divide_length: int,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """One real `generate` run of random prompts (EOS ignored): its wall time, and its rate over
    the rounds that compiled nothing (not the first, nor those where the buffer grew), with the
    buffer size of each such round for comparing against step times."""
    from triattention_jax.decoding import generate

    prompts = np.random.default_rng(1).integers(0, transformer.config.vocab_size, (batch, prompt_tokens)).tolist()
    ends: list[float] = []
    result = generate(
        transformer,
        prompts,
        eos_ids=(),
        max_new_tokens=new_tokens,
        divide_length=divide_length,
        policy=policy,
        on_round=lambda _: ends.append(time.perf_counter()),
        steps_per_call=divide_length,
        mesh=mesh,
    )
    schedule = buffer_schedule(policy, prompt_tokens, new_tokens, divide_length)
    steady = [i for i in range(1, len(ends)) if schedule[i] == schedule[i - 1]]
    seconds = sum(ends[i] - ends[i - 1] for i in steady)
    return {
        "wall_seconds": result.wall_seconds,
        "steady_rounds": len(steady),
        "steady_seconds": seconds,
        "steady_tokens_per_second": batch * divide_length * len(steady) / seconds if steady else float("nan"),
        "steady_round_slots": [schedule[i] for i in steady],
        "kv_cache_bytes": result.kv_cache_bytes,
    }
