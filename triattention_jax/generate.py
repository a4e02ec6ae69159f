"""Prefill and round-based decoding over the fixed KV buffer, all inside `jax.jit`.

Decoding runs in rounds of `divide_length` steps, each a `lax.scan` of the same step
function; the policy's `before_round` (eviction) runs at the start of each round inside the
same jitted function, so the loop compiles once per (batch, buffer) shape. Between rounds
the host streams text and stops once every row has emitted EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from triattention_jax import sharding
from triattention_jax.cache import KVCache, init_cache
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer
from triattention_jax.policies import FullAttention, KVPolicy
from triattention_jax.policies.base import RoundContext
from triattention_jax.sampling import Sampler

DEFAULT_DIVIDE_LENGTH = 128
MIN_PROMPT_BUCKET = 64


def prompt_bucket(length: int) -> int:
    """Prompt lengths are padded to a power of two (at least 64) to bound recompiles."""
    return max(MIN_PROMPT_BUCKET, 1 << (max(length, 1) - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What carries from one decode step to the next besides the cache (pytree).

    token: (batch,) the sampled token not yet fed; position: (batch,) its position;
    done: (batch,) rows that have emitted EOS; step: () tokens emitted so far.
    """

    token: jax.Array
    position: jax.Array
    done: jax.Array
    step: jax.Array



@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """Per prompt: generated ids (EOS included when emitted, nothing after it); kv_cache_bytes:
    the largest buffer held (positions and policy statistics included); kv_payload_bytes: its
    K and V entries alone (a K-only cache: K only)."""

    token_ids: list[list[int]]
    num_prompt_tokens: list[int]
    kv_cache_bytes: int
    wall_seconds: float
    kv_payload_bytes: int = 0

    @property
    def num_generated_tokens(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


def extend_for_policy(
    transformer: Transformer, policy: KVPolicy, cache: KVCache | None, tokens: jax.Array, positions: jax.Array,
    logits_at: jax.Array | None,
):
    """`Transformer.extend`, collecting what the policy observes."""
    return transformer.extend(
        cache, tokens, positions, logits_at=logits_at,
        collect_rope_queries="rope_queries" in policy.observes, collect_attention="attention" in policy.observes,
    )


def _step_logits(transformer: Transformer, policy: KVPolicy, cache: KVCache, token: jax.Array, position: jax.Array):
    tokens, positions = token[:, None], position[:, None]
    out = extend_for_policy(transformer, policy, cache, tokens, positions, jnp.zeros_like(token))
    return out.logits, policy.observe(cache.append(out.k, out.v, positions), out, positions)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots", "all_logits", "mesh"))
def _prefill(graphdef, state, policy: KVPolicy, tokens: jax.Array, lengths: jax.Array, *, num_slots: int, all_logits: bool = False,
             mesh: Mesh | None = None):
    """Runs the right-padded prompts (batch, bucket) and hands their cache to the policy.

    Returns logits at each row's last prompt token (or at every position) and the buffer,
    laid out on `mesh` when given (`sharding.constrain_cache`).
    """
    transformer = nnx.merge(graphdef, state)
    batch, bucket = tokens.shape
    index = jnp.arange(bucket)[None]
    positions = jnp.where(index < lengths[:, None], index, -1)
    out = extend_for_policy(transformer, policy, None, tokens, positions, None if all_logits else lengths - 1)
    cache = init_cache(transformer.config, batch, bucket, transformer.dtype, values=transformer.value_layers)
    cache = cache.append(out.k, out.v, positions)
    context = RoundContext(prompt_lengths=lengths, position=lengths)
    return out.logits, sharding.constrain_cache(policy.fit_prefill(policy.start(cache, out, positions), num_slots, context), mesh)


_resized = jax.jit(KVCache.resized, static_argnums=1)


def buffer_schedule(policy: KVPolicy, prompt_tokens: int, new_tokens: int, divide_length: int) -> list[int]:
    """The buffer size of every decode round after a prompt of `prompt_tokens` (the longest
    row), as `generate` and `teacher_force` size it: host-side, known before decoding."""
    bucket = prompt_bucket(prompt_tokens)
    max_slots = policy.num_slots(bucket, new_tokens, divide_length)
    slots = policy.prefill_slots(bucket, max_slots)
    schedule = []
    for index in range(-(-new_tokens // divide_length)):
        slots = policy.round_slots(slots, bucket + index * divide_length, divide_length, max_slots)
        schedule.append(slots)
    return schedule


def _sized(cache: KVCache, num_slots: int) -> KVCache:
    """The cache in a buffer of `num_slots` (a copy only when it grows)."""
    return cache if num_slots == cache.num_slots else _resized(cache, num_slots)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "divide_length", "mesh"), donate_argnames=("cache",))
def _generation_round(
    graphdef, state, policy: KVPolicy, cache: KVCache, decode: DecodeState, prompt_lengths: jax.Array, key: jax.Array,
    eos_ids: jax.Array, *, sampler: Sampler, divide_length: int, mesh: Mesh | None = None,
):
    transformer = nnx.merge(graphdef, state)
    context = RoundContext(prompt_lengths=prompt_lengths, position=decode.position)
    cache = sharding.constrain_cache(policy.before_round(cache, divide_length, context), mesh)

    def step(carry, _):
        cache, d = carry
        emitted = jnp.where(d.done, -1, d.token)
        done = d.done | jnp.isin(d.token, eos_ids)
        logits, cache = _step_logits(transformer, policy, cache, d.token, d.position)
        cache = sharding.constrain_cache(cache, mesh)
        token = sampler(logits, jax.random.fold_in(key, d.step))
        return (cache, DecodeState(token, d.position + 1, done, d.step + 1)), emitted

    (cache, decode), emitted = jax.lax.scan(step, (cache, decode), length=divide_length)
    return cache, decode, emitted.T


@functools.partial(jax.jit, static_argnames=("graphdef", "divide_length", "mesh"), donate_argnames=("cache",))
def _teacher_forced_round(
    graphdef, state, policy: KVPolicy, cache: KVCache, tokens: jax.Array, positions: jax.Array, prompt_lengths: jax.Array,
    *, divide_length: int, mesh: Mesh | None = None,
):
    transformer = nnx.merge(graphdef, state)
    context = RoundContext(prompt_lengths=prompt_lengths, position=positions[:, 0])
    cache = sharding.constrain_cache(policy.before_round(cache, divide_length, context), mesh)

    def step(cache, xs):
        logits, cache = _step_logits(transformer, policy, cache, *xs)
        return sharding.constrain_cache(cache, mesh), jax.nn.log_softmax(logits, axis=-1)

    cache, logprobs = jax.lax.scan(step, cache, (tokens.T, positions.T))
    return cache, logprobs.transpose(1, 0, 2)


def _split(transformer: Transformer, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split`, with the weights placed on the mesh when given (a no-op for those already there)."""
    return nnx.split(transformer if mesh is None else sharding.shard_transformer(transformer, mesh))


def _rows(mesh: Mesh | None, *arrays: np.ndarray) -> list[jax.Array]:
    """Host arrays whose leading axis is the batch, split over the mesh's data axis when given."""
    return [jnp.asarray(x) if mesh is None else sharding.put_batch(x, mesh) for x in arrays]


def generate(
    transformer: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    sampler: Sampler = Sampler(),
    policy: KVPolicy = FullAttention(),
    divide_length: int = DEFAULT_DIVIDE_LENGTH,
    seed: int = 0,
    on_round: Callable[[list[list[int]]], None] | None = None,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Generates up to `max_new_tokens` per prompt (token id lists of any lengths).

    Rows stop at their first EOS (pass no eos_ids to never stop); `on_round` receives the
    tokens generated so far after every round, for streaming. With a `mesh`
    (`sharding.make_mesh`), rows are split over its data axis (their number must be a
    multiple of it) and heads over its model axis; weights not yet on it are placed.
    """
    config = transformer.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if divide_length < 1:
        raise UserError(f"divide_length must be at least 1, got {divide_length}")
    if mesh is not None:
        sharding.check_batch(len(prompts), mesh)
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise UserError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens: shorten the prompt or lower --max_new_tokens"
        )
    start = time.perf_counter()
    bucket = prompt_bucket(longest)
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    policy.check(lengths.tolist(), divide_length, slim=transformer.slim)
    num_slots = policy.num_slots(bucket, max_new_tokens, divide_length)
    graphdef, state = _split(transformer, mesh)
    tokens, prompt_lengths = _rows(mesh, tokens, lengths)
    key = jax.random.key(seed)
    logits, cache = _prefill(graphdef, state, policy, tokens, prompt_lengths, num_slots=num_slots, mesh=mesh)
    kv_cache_bytes = kv_payload_bytes = 0
    decode = DecodeState(
        token=sampler(logits, jax.random.fold_in(key, 2**31 - 1)),
        position=prompt_lengths,
        done=jnp.zeros(len(prompts), bool),
        step=jnp.zeros((), jnp.int32),
    )
    eos = jnp.asarray(list(eos_ids) or [-2], jnp.int32)
    generated: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)
    rounds = 0
    schedule = buffer_schedule(policy, longest, max_new_tokens, divide_length)
    while min(len(g) for g in generated) < max_new_tokens and not finished.all():
        cache = _sized(cache, schedule[rounds])
        kv_cache_bytes = max(kv_cache_bytes, cache.nbytes)
        kv_payload_bytes = max(kv_payload_bytes, cache.payload_nbytes)
        rounds += 1
        cache, decode, emitted = _generation_round(
            graphdef, state, policy, cache, decode, prompt_lengths, key, eos, sampler=sampler, divide_length=divide_length,
            mesh=mesh,
        )
        for row, row_tokens in enumerate(sharding.to_host(emitted)):
            kept = [int(t) for t in row_tokens if t >= 0]
            generated[row].extend(kept[: max_new_tokens - len(generated[row])])
        finished = sharding.to_host(decode.done) | np.array([len(g) >= max_new_tokens for g in generated])
        if on_round is not None:
            on_round(generated)
    return GenerationResult(
        token_ids=generated,
        num_prompt_tokens=lengths.tolist(),
        kv_cache_bytes=kv_cache_bytes,
        kv_payload_bytes=kv_payload_bytes,
        wall_seconds=time.perf_counter() - start,
    )


def teacher_force(
    transformer: Transformer,
    tokens: np.ndarray,
    *,
    prefill_length: int,
    policy: KVPolicy = FullAttention(),
    divide_length: int = DEFAULT_DIVIDE_LENGTH,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Log-probabilities of the next token at every position of `tokens` (batch, T).

    The first `prefill_length` tokens are prefilled; the rest are fed one at a time through
    the same decode step, cache and eviction as generation. Returns float32 (batch, T, vocab):
    row t is the distribution predicting token t + 1. `mesh` as in `generate`.
    """
    config = transformer.config
    tokens = np.asarray(tokens, np.int32)
    batch, total = tokens.shape
    if not 1 <= prefill_length <= total:
        raise UserError(f"prefill_length must be in [1, {total}], got {prefill_length}")
    if total > config.max_position_embeddings:
        raise UserError(f"sequence of {total} tokens exceeds the model's context of {config.max_position_embeddings}")
    if mesh is not None:
        sharding.check_batch(batch, mesh)
    bucket = prompt_bucket(prefill_length)
    padded = np.zeros((batch, bucket), np.int32)
    padded[:, :prefill_length] = tokens[:, :prefill_length]
    policy.check([prefill_length] * batch, divide_length, slim=transformer.slim)
    num_slots = policy.num_slots(bucket, total - prefill_length, divide_length)
    graphdef, state = _split(transformer, mesh)
    padded, prompt_lengths = _rows(mesh, padded, np.full(batch, prefill_length, np.int32))
    logits, cache = _prefill(graphdef, state, policy, padded, prompt_lengths, num_slots=num_slots, all_logits=True, mesh=mesh)
    pieces = [sharding.to_host(jax.nn.log_softmax(logits[:, :prefill_length], axis=-1))]
    schedule = buffer_schedule(policy, prefill_length, total - prefill_length, divide_length)
    for round_slots, begin in zip(schedule, range(prefill_length, total, divide_length)):
        cache = _sized(cache, round_slots)
        chunk = np.zeros((batch, divide_length), np.int32)
        width = min(divide_length, total - begin)
        chunk[:, :width] = tokens[:, begin : begin + width]
        positions = np.broadcast_to(np.arange(begin, begin + divide_length, dtype=np.int32), (batch, divide_length))
        chunk, positions = _rows(mesh, chunk, positions)
        cache, logprobs = _teacher_forced_round(
            graphdef, state, policy, cache, chunk, positions, prompt_lengths, divide_length=divide_length, mesh=mesh
        )
        pieces.append(sharding.to_host(logprobs)[:, :width])
    return np.concatenate(pieces, axis=1)
