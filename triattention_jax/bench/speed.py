"""Steady-state decode timing on whatever device JAX has: what `benchmark.py` reports.

A decode round (`divide_length` steps in one jitted `lax.scan`, eviction included) is timed on
a buffer in the exact state it has in the middle of a long generation: `filled` slots in use
(full attention: its one buffer, filled to where the round starts; eviction methods: their
fixed buffer, full, so the round starts with a compaction as every steady round does). Only K,
V and positions are synthetic; the policy's own statistics and state come from a real prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import heapq
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from triattention_jax import sharding
from triattention_jax.cache import EMPTY_POSITION, KVCache
from triattention_jax.decoding import (
    DecodeState,
    decode_round,
    prefill,
    prompt_bucket,
    put_rows,
    round_steps,
    split_model,
)
from triattention_jax.model import Transformer
from triattention_jax.policies import EvictionPolicy, KVPolicy
from triattention_jax.sampling import Sampler

SYNTHETIC_PROMPT = 64
# The batches whose compiled rounds give the scratch per sequence and the fixed scratch.
MEMORY_BATCHES = (2, 4)


def device_seconds(fn: Callable[[jax.Array], jax.Array], x: jax.Array, repeats: int, chained: int) -> float:
    """Median seconds of one `fn(x)` on the device: each repetition queues `chained` calls back
    to back and waits for the last (the device runs them in order), so the host's dispatch and
    synchronisation are spread over `chained` calls rather than added to each."""
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(chained):
            out = fn(x)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / chained)
    return float(np.median(times))


def roofline(nbytes: int | None = None) -> dict[str, Any]:
    """Memory bandwidth the decode steps are held to: the larger of a device-to-device copy
    (bytes read + written) and a read-only reduction (bytes read) over an `nbytes` array.
    Default size: 4 GiB on accelerators, far beyond their caches, median of 15 repetitions;
    on the CPU 64 MiB and 5 repetitions, only a small-size reading (labelled so in `size`)."""
    cpu = jax.default_backend() == "cpu"
    nbytes = nbytes or (1 << 26 if cpu else 1 << 32)
    repeats, chained = (5, 2) if cpu else (15, 8)
    x = jax.jit(lambda: (jax.lax.iota(jnp.int32, nbytes // 2) % 251).astype(jnp.bfloat16))()
    copy = device_seconds(jax.jit(jnp.copy), x, repeats, chained)
    # One sum of everything: faster than row sums on an H200 (8 GiB: 4.48 against 4.16 TB/s).
    read = device_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x, repeats, chained)
    copy_rate, read_rate = 2 * x.nbytes / copy, x.nbytes / read
    return {
        "copy_bytes_per_second": copy_rate,
        "read_bytes_per_second": read_rate,
        "roofline_bytes_per_second": max(copy_rate, read_rate),
        "roofline_source": "copy" if copy_rate >= read_rate else "read",
        "bytes": nbytes,
        "size": f"{nbytes / 2**30:g} GiB" + (" (CPU: small size)" if cpu else ""),
        "timing": f"median of {repeats} repetitions of {chained} chained calls, host clock after device sync",
    }


def weight_bytes(transformer: Transformer) -> int:
    """The weights' bytes held by one device (all of them without a mesh)."""
    return device_bytes(nnx.state(transformer, nnx.Param))


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


def time_rounds(
    setup: RoundSetup, divide_length: int, cursors: list[int], repeats: int = 5, *, profile_first: bool = False
) -> tuple[list[float], RoundProfile | None]:
    """Median seconds of one round started at each cursor (reset before every round, so each
    round starts from the same buffer state), and with profile_first where one more round
    started at the first cursor spends its device time (`RoundProfile`, from a profiler trace)."""
    cache = setup.cache

    def round_inputs(cursor: int) -> tuple[tuple, dict]:
        nonlocal cache
        cache = dataclasses.replace(cache, cursor=jnp.asarray(cursor, jnp.int32))
        jax.block_until_ready(cache)
        return setup.round_arguments(cache, divide_length)

    def timed_round(inputs: tuple[tuple, dict]) -> float:
        nonlocal cache
        args, options = inputs
        start = time.perf_counter()
        cache, _, emitted = decode_round(*args, **options)
        jax.block_until_ready(emitted)
        return time.perf_counter() - start

    medians, profile = [], None
    for cursor in cursors:
        # The first call may compile.
        times = [timed_round(round_inputs(cursor)) for _ in range(repeats + 1)][1:]
        medians.append(float(np.median(times)))
    if profile_first:
        inputs = round_inputs(cursors[0])  # outside the trace: only the timed round's ops count
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                wall = timed_round(inputs)
            profile = RoundProfile.from_trace(trace_dir, wall, devices=1 if setup.mesh is None else setup.mesh.size)
    return medians, profile


# The instance number XLA appends to an op's or a kernel's name (fusion.12, loop_add_fusion_3).
_INSTANCE = re.compile(r"([._]\d+)+$")
# Collective operations as XLA names them (HLO ops on the CPU, their kernels on a GPU: NCCL).
_COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|nccl", re.IGNORECASE)


def _innermost_times(timeline: list[dict]) -> dict[str, float]:
    """Microseconds of a timeline's events (name without instance number) during which each is
    the innermost running: the latest started, the shorter one of two that start together."""
    order = sorted(timeline, key=lambda e: (e["ts"], -e.get("dur", 0)))
    points = sorted({e["ts"] for e in order} | {e["ts"] + e.get("dur", 0) for e in order})
    running: list[tuple[float, float, int, str]] = []  # heap of (−start, dur, index, name)
    times: dict[str, float] = {}
    following = 0
    for here, after in zip(points, points[1:]):
        while following < len(order) and order[following]["ts"] <= here:
            e = order[following]
            heapq.heappush(running, (-e["ts"], e.get("dur", 0), following, _INSTANCE.sub("", e["name"])))
            following += 1
        while running and -running[0][0] + running[0][1] <= here:
            heapq.heappop(running)  # the innermost has ended; an outer one takes over
        if running:
            name = running[0][3]
            times[name] = times.get(name, 0.0) + after - here
    return times


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundProfile:
    """Where one profiled round spends its device time, per device: ops, each (name, share of
    the round's wall time), the largest first, and the share of collectives among them. An op
    is a kernel (GPU) or thunk (CPU) name without its instance number, so a kernel that every
    layer runs is one op."""

    wall_seconds: float
    ops: tuple[tuple[str, float], ...]
    collective_share: float

    @classmethod
    def from_trace(cls, trace_dir: str, wall_seconds: float, *, devices: int) -> RoundProfile:
        """From a `jax.profiler.trace(..., create_perfetto_trace=True)` folder of a run that
        took wall_seconds. Only XLA's ops count (events naming their HLO op; on a GPU, the
        kernels on the devices' own timelines), each by its self time: every instant of a
        timeline goes to the innermost (latest started) op running then, so a CPU's while
        loop does not count the ops inside it twice. A host's ops are one timeline per process:
        XLA:CPU runs a program's ops on whichever pool thread is free, so a loop's body often
        runs on other threads than the loop, and ops side by side count their overlap once."""
        [path] = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        device_pids = {
            e["pid"]
            for e in events
            if e.get("ph") == "M"
            and e.get("name") == "process_name"
            and "/device:" in str(e.get("args", {}).get("name"))
        }
        timelines: dict[tuple, list[dict]] = {}
        for e in events:
            if e.get("pid") in device_pids and e.get("ph") == "X":
                timelines.setdefault((e.get("pid"), e.get("tid")), []).append(e)
            elif e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
                timelines.setdefault((e.get("pid"),), []).append(e)
        per_microsecond = 1e-6 / devices / wall_seconds
        busy: dict[str, float] = {}
        collectives = 0.0
        for timeline in timelines.values():
            for name, microseconds in _innermost_times(timeline).items():
                busy[name] = busy.get(name, 0.0) + microseconds * per_microsecond
            for e in timeline:
                if _COLLECTIVE.search(e["name"]):
                    collectives += e.get("dur", 0) * per_microsecond
        ops = tuple(sorted(busy.items(), key=lambda item: -item[1]))
        return cls(wall_seconds=wall_seconds, ops=ops, collective_share=collectives)

    def top(self, count: int) -> list[dict[str, Any]]:
        return [{"op": name, "share": share} for name, share in self.ops[:count]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTime:
    """One steady decode step on a buffer of `slots` slots whose round starts at cursor
    `filled`; bytes_per_step: what the step needs to read (weights, and K, V and positions of
    the slots in use, their mean over the round's steps), one device's share. For the first
    timed fill, on a mesh of several devices collective_share: the share of the round's time
    a device spends in collectives, and when asked for, profile: where its time goes (both from
    a profiler trace of one more round)."""

    method: str
    batch: int
    slots: int
    filled: int
    step_seconds: float
    bytes_per_step: int
    eviction_share: float | None = None
    collective_share: float | None = None
    profile: RoundProfile | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.step_seconds


def measure_steps(
    transformer: Transformer,
    policy: KVPolicy,
    method: str,
    *,
    batch: int,
    slots: int,
    fills: list[int],
    divide_length: int,
    mesh: Mesh | None = None,
    profile: bool = False,
) -> list[StepTime]:
    """Steady steps on one buffer of `slots` slots, a round started at each cursor in `fills`
    (slots past it keep stale entries: the decode kernel stops at the cursor, the XLA path
    reads the whole buffer either way). An eviction policy's round that does not fit compacts
    first; the share of its time spent compacting comes from the same round started at
    `budget` (no compaction). profile: also trace one round at the first fill."""
    evicts = isinstance(policy, EvictionPolicy)
    setup = steady_round(transformer, policy, batch=batch, slots=slots, filled=max(fills), mesh=mesh)
    weights = weight_bytes(nnx.merge(setup.graphdef, setup.state))
    slot_bytes = device_bytes((setup.cache.k, setup.cache.v, setup.cache.pos)) / slots
    compacting = [evicts and fill + divide_length > slots for fill in fills]
    cursors = [c for fill, compacts in zip(fills, compacting) for c in ([fill, policy.budget] if compacts else [fill])]
    sharded = mesh is not None and mesh.size > 1
    # One call: each round donates the buffer.
    measured, traced = time_rounds(setup, divide_length, cursors, profile_first=sharded or profile)
    times = iter(measured)
    steps = []
    for fill, compacts in zip(fills, compacting):
        seconds = next(times)
        first = policy.budget if compacts else fill
        steps.append(
            StepTime(
                method=method,
                batch=batch,
                slots=slots,
                filled=fill,
                step_seconds=seconds / divide_length,
                bytes_per_step=int(weights + slot_bytes * (first + (divide_length - 1) / 2)),
                eviction_share=max(0.0, 1 - next(times) / seconds) if compacts else None,
                collective_share=traced.collective_share if sharded and fill == fills[0] else None,
                profile=traced if profile and fill == fills[0] else None,
            )
        )
    return steps


def round_fills(policy: KVPolicy, prompt_tokens: int, new_tokens: int, divide_length: int) -> list[int]:
    """The cursor at the start of every decode round of a generation, counting every token
    (full attention's fill; eviction methods are timed with their buffer full whatever it is)."""
    fills = [policy.prefill_cursor(prompt_tokens, prompt_bucket(prompt_tokens))]
    for steps in round_steps(policy, prompt_tokens, new_tokens, divide_length)[:-1]:
        fills.append(fills[-1] + steps)
    return fills


def timed_fills(policy: KVPolicy, prompt_tokens: int, new_tokens: int, divide_length: int) -> list[int]:
    """Where a generation's steps are timed: an eviction policy's full buffer (its steady,
    compacting round); full attention's first, middle and last round."""
    if isinstance(policy, EvictionPolicy):
        return [policy.num_slots(prompt_bucket(prompt_tokens), new_tokens, divide_length)]
    fills = round_fills(policy, prompt_tokens, new_tokens, divide_length)
    return sorted({fills[0], fills[len(fills) // 2], fills[-1]})


def integrated(
    fit: Callable[[int], float], policy: KVPolicy, prompt_tokens: int, new_tokens: int, divide_length: int
) -> float:
    """A per-step quantity fitted against the round's starting cursor (seconds, bytes), summed
    over every step of a generation."""
    rounds = round_steps(policy, prompt_tokens, new_tokens, divide_length)
    fills = round_fills(policy, prompt_tokens, new_tokens, divide_length)
    return sum(steps * fit(fill) for steps, fill in zip(rounds, fills))


def linear_fit(points: list[tuple[int, float]]) -> Callable[[int], float]:
    """A per-step quantity against the round's starting cursor (weights are read once per
    step, each slot in use once): least squares a + b * cursor through the measured points."""
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    if len(points) == 1:
        return lambda fill: float(ys[0])
    slope, intercept = np.polyfit(xs, ys, 1)
    return lambda fill: float(intercept + slope * fill)


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
    """Device bytes of a generation beyond the weights: per sequence, the buffer (allocated
    once, policy statistics included) and the round's scratch memory (compaction gathers into
    new arrays, scoring works in float32); once per batch, the scratch that does not grow with
    it (logits, norms). The prefill's own scratch is not counted: it runs before the decode
    rounds and is not part of the steady state timed here."""

    buffer: int
    scratch: int
    fixed_scratch: int


def sequence_memory(
    transformer: Transformer,
    policy: KVPolicy,
    prompt_tokens: int,
    new_tokens: int,
    divide_length: int,
    mesh: Mesh | None = None,
) -> SequenceMemory:
    """Measured from the compiled round on the run's buffer, at 2 and 4 rows per device (XLA
    may compile batch 1 differently: an H100 Qwen3-8B round reserved 579 MiB at batch 1, 28
    at 2). On a mesh, one device's bytes per row of its share of the batch (the KV heads of
    each row split over the model axis)."""
    slots = policy.num_slots(prompt_bucket(prompt_tokens), new_tokens, divide_length)
    data = 1 if mesh is None else mesh.shape["data"]
    temps = []
    for rows in MEMORY_BATCHES:
        setup = steady_round(transformer, policy, batch=rows * data, slots=slots, filled=1, mesh=mesh)
        temps.append(round_temp_bytes(setup, divide_length))
    small, large = MEMORY_BATCHES
    per_sequence = max(0, (temps[1] - temps[0]) // (large - small))
    return SequenceMemory(
        buffer=(device_bytes(setup.cache) - device_bytes(setup.cache.cursor)) // large,
        scratch=per_sequence,
        fixed_scratch=max(0, temps[0] - small * per_sequence),
    )


def largest_batch(
    memory_bytes: int, weights: int, memory: SequenceMemory, reserve: float = 0.1, mesh: Mesh | None = None
) -> int:
    """Rows that fit when `reserve` of each device's memory is left free (allocator slack):
    memory_bytes, weights and `memory` are one device's; on a mesh, every data shard holds
    as many rows."""
    free = memory_bytes * (1 - reserve) - weights - memory.fixed_scratch
    data = 1 if mesh is None else mesh.shape["data"]
    return data * max(0, int(free // (memory.buffer + memory.scratch)))


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
    the rounds that compiled nothing (not the first, nor one of another length than the one
    before), with the cursor each such round started at, for comparing against step times."""
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
    rounds = round_steps(policy, prompt_tokens, new_tokens, divide_length)
    fills = round_fills(policy, prompt_tokens, new_tokens, divide_length)
    steady = [i for i in range(1, len(ends)) if rounds[i] == rounds[i - 1]]
    seconds = sum(ends[i] - ends[i - 1] for i in steady)
    return {
        "wall_seconds": result.wall_seconds,
        "steady_rounds": len(steady),
        "steady_seconds": seconds,
        "steady_tokens_per_second": sum(batch * rounds[i] for i in steady) / seconds if steady else float("nan"),
        "steady_round_fills": [fills[i] for i in steady],
        "kv_cache_bytes": result.kv_cache_bytes,
    }
