"""Prefill and round-based decoding over the fixed KV buffer, all inside `jax.jit`.

Decoding runs in rounds of `divide_length` steps, each a `lax.scan` of the same step
function; the policy's `before_round` (eviction) runs at the start of each round inside the
same jitted function, so the loop compiles once per (batch, buffer) shape. A policy may cut
the first round short to set the phase of the rest (`KVPolicy.first_round_steps`). Between
rounds the host streams text and stops once every row has emitted EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from triattention_jax import sharding
from triattention_jax.cache import KVCache, cache_nbytes, init_cache
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer
from triattention_jax.policies import FullAttention, KVPolicy
from triattention_jax.policies.base import RoundContext
from triattention_jax.prompts import encode_prompts, has_chat_template
from triattention_jax.sampling import Sampler

if TYPE_CHECKING:
    from triattention_jax.checkpoints.store import LoadedModel

MIN_PROMPT_BUCKET = 64
# Streaming and early stop look at the tokens at least this often (steps).
STREAM_STEPS = 16


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
    """Per prompt: generated ids (EOS included when emitted, nothing after it) and, when the
    model came with a tokenizer, their text (special tokens skipped); kv_cache_bytes: the
    largest buffer held (positions and policy statistics included); kv_payload_bytes: its K
    and V entries alone (a K-only cache: K only); num_decode_steps: the decode steps run (all
    rows step together, until the longest row ends)."""

    token_ids: list[list[int]]
    num_prompt_tokens: list[int]
    kv_cache_bytes: int
    wall_seconds: float
    kv_payload_bytes: int = 0
    texts: list[str] | None = None
    num_decode_steps: int = 0

    @property
    def num_generated_tokens(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


def extend_for_policy(
    transformer: Transformer,
    policy: KVPolicy,
    cache: KVCache | None,
    tokens: jax.Array,
    positions: jax.Array,
    logits_at: jax.Array | None,
    mesh: Mesh | None = None,
):
    """`Transformer.extend`, collecting what the policy observes; on `mesh` when given."""
    return transformer.extend(
        cache,
        tokens,
        positions,
        logits_at=logits_at,
        collect_pre_rope="queries" in policy.observes,
        collect_rope_queries="rope_queries" in policy.observes,
        collect_attention="attention" in policy.observes,
        pin=None if mesh is None else sharding.pinner(mesh),
    )


def _step_logits(
    transformer: Transformer, policy: KVPolicy, cache: KVCache, token: jax.Array, position: jax.Array, mesh: Mesh | None
):
    tokens, positions = token[:, None], position[:, None]
    out = extend_for_policy(transformer, policy, cache, tokens, positions, jnp.zeros_like(token), mesh)
    return out.logits, policy.observe(cache.append(out.k, out.v, positions), out, positions)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots", "all_logits", "mesh"))
def prefill(
    graphdef,
    state,
    policy: KVPolicy,
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    num_slots: int,
    all_logits: bool = False,
    mesh: Mesh | None = None,
):
    """Runs the right-padded prompts (batch, bucket) and hands their cache to the policy.

    Returns logits at each row's last prompt token (or at every position) and the buffer,
    laid out on `mesh` when given (`sharding.constrain_cache`).
    """
    transformer = nnx.merge(graphdef, state)
    batch, bucket = tokens.shape
    index = jnp.arange(bucket)[None]
    positions = jnp.where(index < lengths[:, None], index, -1)
    out = extend_for_policy(transformer, policy, None, tokens, positions, None if all_logits else lengths - 1, mesh)
    cache = init_cache(transformer.config, batch, bucket, transformer.dtype, values=transformer.value_layers)
    cache = cache.append(out.k, out.v, positions)
    context = RoundContext(prompt_lengths=lengths, position=lengths)
    return out.logits, sharding.constrain_cache(
        policy.fit_prefill(policy.start(cache, out, positions), num_slots, context), mesh
    )


def round_steps(policy: KVPolicy, prompt_tokens: int, new_tokens: int, divide_length: int) -> list[int]:
    """The steps of every decode round after a prompt of `prompt_tokens` (the longest row),
    covering `new_tokens` (`KVPolicy.round_steps`): what `generate` and `teacher_force` run."""
    return policy.round_steps(prompt_tokens, prompt_bucket(prompt_tokens), new_tokens, divide_length)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "sampler", "divide_length", "num_steps", "start_of_round", "mesh"),
    donate_argnames=("cache",),
)
def decode_round(
    graphdef,
    state,
    policy: KVPolicy,
    cache: KVCache,
    decode: DecodeState,
    prompt_lengths: jax.Array,
    key: jax.Array,
    eos_ids: jax.Array,
    *,
    sampler: Sampler,
    divide_length: int,
    num_steps: int | None = None,
    start_of_round: bool = True,
    mesh: Mesh | None = None,
):
    """`num_steps` decode steps (default: a whole round of `divide_length`), preceded by the
    policy's `before_round` when `start_of_round`; the later pieces of a round skip it, so a
    round split into pieces evicts exactly as a whole one. A first round cut short
    (`KVPolicy.first_round_steps`) is pieces of another length, with the same `divide_length`."""
    transformer = nnx.merge(graphdef, state)
    if start_of_round:
        context = RoundContext(prompt_lengths=prompt_lengths, position=decode.position)
        cache = sharding.constrain_cache(policy.before_round(cache, divide_length, context), mesh)

    def step(carry, _):
        cache, d = carry
        emitted = jnp.where(d.done, -1, d.token)
        done = d.done | jnp.isin(d.token, eos_ids)
        logits, cache = _step_logits(transformer, policy, cache, d.token, d.position, mesh)
        cache = sharding.constrain_cache(cache, mesh)
        token = sampler(logits, jax.random.fold_in(key, d.step))
        return (cache, DecodeState(token, d.position + 1, done, d.step + 1)), emitted

    (cache, decode), emitted = jax.lax.scan(step, (cache, decode), length=num_steps or divide_length)
    return cache, decode, emitted.T


@functools.partial(jax.jit, static_argnames=("graphdef", "divide_length", "block", "mesh"), donate_argnames=("cache",))
def teacher_forced_round(
    graphdef,
    state,
    policy: KVPolicy,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    prompt_lengths: jax.Array,
    *,
    divide_length: int,
    block: bool = True,
    mesh: Mesh | None = None,
):
    """One round of given tokens (batch, steps) at `positions` (steps: `divide_length`, or
    fewer for a first round cut short), after the policy's `before_round`; returns the cache
    and float32 log-probs (batch, steps, vocab).

    Nothing is evicted inside a round, so with `block` the round's tokens run as one `extend`
    against the cache (matrix products instead of one weight read per token) and the policy
    observes them at once: every observation is a sum or a window over the round's queries,
    the same as step by step up to float rounding. `block=False` feeds them one at a time
    through generation's decode step.
    """
    transformer = nnx.merge(graphdef, state)
    context = RoundContext(prompt_lengths=prompt_lengths, position=positions[:, 0])
    cache = sharding.constrain_cache(policy.before_round(cache, divide_length, context), mesh)
    if block:
        out = extend_for_policy(transformer, policy, cache, tokens, positions, None, mesh)
        cache = policy.observe(cache.append(out.k, out.v, positions), out, positions)
        return sharding.constrain_cache(cache, mesh), jax.nn.log_softmax(out.logits, axis=-1)

    def step(cache, xs):
        logits, cache = _step_logits(transformer, policy, cache, *xs, mesh)
        return sharding.constrain_cache(cache, mesh), jax.nn.log_softmax(logits, axis=-1)

    cache, logprobs = jax.lax.scan(step, cache, (tokens.T, positions.T))
    return cache, logprobs.transpose(1, 0, 2)


def split_model(transformer: Transformer, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split`, with the weights placed on the mesh when given (a no-op for those already there)."""
    return nnx.split(transformer if mesh is None else sharding.shard_transformer(transformer, mesh))


def put_rows(mesh: Mesh | None, *arrays: np.ndarray) -> list[jax.Array]:
    """Host arrays whose leading axis is the batch, split over the mesh's data axis when given."""
    return [jnp.asarray(x) if mesh is None else sharding.put_batch(x, mesh) for x in arrays]


def generate(
    model: Transformer | LoadedModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] | None = None,
    sampler: Sampler = Sampler(),
    policy: KVPolicy = FullAttention(),
    divide_length: int = DEFAULT_DIVIDE_LENGTH,
    seed: int = 0,
    chat: bool | None = None,
    on_round: Callable[[list[list[int]]], None] | None = None,
    steps_per_call: int | None = None,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Generates up to `max_new_tokens` per prompt.

    model: a `Transformer`, or what `load_model` returns (then prompts may be strings, encoded
    with the tokenizer's chat template unless `chat=False`, and the result carries texts).
    prompts: strings, or token id lists of any lengths. Rows stop at their first EOS: by
    default the model's (its generation config's), `eos_ids=()` never stops. Decoding runs in
    jitted pieces of `steps_per_call` steps, a divisor of `divide_length` (default: at most
    `STREAM_STEPS` with EOS ids or `on_round`, else whole rounds; a first round cut short by the
    policy, or a run of fewer tokens than its first round, runs in the longest pieces of at most
    `steps_per_call` that divide it); `on_round` receives the tokens generated so far after each
    piece, for streaming, and decoding stops within a piece of the last row's EOS. Eviction runs
    between rounds whatever the pieces. With a `mesh` (`sharding.make_mesh`), rows are split over
    its data axis (their number must be a multiple of it) and heads over its model axis; weights
    not yet on it are placed.
    """
    transformer, tokenizer = _transformer_and_tokenizer(model)
    prompts = _token_prompts(tokenizer, prompts, chat)
    config = transformer.config
    eos_ids = config.eos_token_ids if eos_ids is None else tuple(eos_ids)
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
    policy.check(lengths.tolist(), divide_length, slim=transformer.slim, context_length=config.max_position_embeddings)
    num_slots = policy.num_slots(bucket, max_new_tokens, divide_length)
    _check_buffer_fits(transformer, len(prompts), num_slots, mesh)
    graphdef, state = split_model(transformer, mesh)
    tokens, prompt_lengths = put_rows(mesh, tokens, lengths)
    key = jax.random.key(seed)
    logits, cache = prefill(graphdef, state, policy, tokens, prompt_lengths, num_slots=num_slots, mesh=mesh)
    # Every policy keeps the buffer `prefill` returns to the end of decoding.
    kv_cache_bytes, kv_payload_bytes = cache.nbytes, cache.payload_nbytes
    decode = DecodeState(
        token=sampler(logits, jax.random.fold_in(key, 2**31 - 1)),
        position=prompt_lengths,
        done=jnp.zeros(len(prompts), bool),
        step=jnp.zeros((), jnp.int32),
    )
    eos = jnp.asarray(list(eos_ids) or [-2], jnp.int32)
    if steps_per_call is None:
        steps_per_call = _piece_steps(divide_length, STREAM_STEPS) if eos_ids or on_round is not None else divide_length
    if steps_per_call < 1 or divide_length % steps_per_call:
        raise UserError(f"steps_per_call must divide divide_length={divide_length}, got {steps_per_call}")
    generated: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)
    steps = 0
    rounds = round_steps(policy, longest, max_new_tokens, divide_length)
    if len(rounds) == 1:
        # A run within its first round decodes only its tokens: one compilation either way. Longer
        # runs keep whole rounds, compiled once each, rather than compile a shorter last one.
        rounds = [min(rounds[0], max_new_tokens)]
    round_index = round_done = 0  # the round running and the steps it has run
    while min(len(g) for g in generated) < max_new_tokens and not finished.all():
        start_of_round = round_done == 0
        piece = _piece_steps(rounds[round_index], steps_per_call)
        cache, decode, emitted = decode_round(
            graphdef,
            state,
            policy,
            cache,
            decode,
            prompt_lengths,
            key,
            eos,
            sampler=sampler,
            divide_length=divide_length,
            num_steps=piece,
            start_of_round=start_of_round and policy.evicts,
            mesh=mesh,
        )
        steps += piece
        round_done += piece
        if round_done == rounds[round_index]:
            round_index, round_done = round_index + 1, 0
        for row, row_tokens in enumerate(sharding.to_host(emitted)):
            kept = [int(t) for t in row_tokens if t >= 0]
            generated[row].extend(kept[: max_new_tokens - len(generated[row])])
        finished = sharding.to_host(decode.done) | np.array([len(g) >= max_new_tokens for g in generated])
        if on_round is not None:
            on_round(generated)
    texts = None if tokenizer is None else [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return GenerationResult(
        token_ids=generated,
        num_prompt_tokens=lengths.tolist(),
        kv_cache_bytes=kv_cache_bytes,
        kv_payload_bytes=kv_payload_bytes,
        wall_seconds=time.perf_counter() - start,
        texts=texts,
        num_decode_steps=steps,
    )


def _check_buffer_fits(transformer: Transformer, batch: int, num_slots: int, mesh: Mesh | None) -> None:
    """Refuses, before allocating, a KV buffer larger than the memory free on a device."""
    total = cache_nbytes(transformer.config, batch, num_slots, transformer.dtype, values=transformer.value_layers)
    per_device = total // (1 if mesh is None else mesh.size)
    free = free_device_memory()
    if free is not None and per_device > free:
        raise UserError(
            f"the KV buffer needs {per_device / 2**30:.2f} GiB per device ({batch} rows x {num_slots} slots), "
            f"more than the {free / 2**30:.2f} GiB free: lower --budget, --max_new_tokens or the number of prompts"
        )


def free_device_memory() -> int | None:
    """Bytes free on the first local device: the accelerator's allocator limit, or the host's
    available memory on the CPU; None when neither is known."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _piece_steps(steps: int, most: int) -> int:
    """The longest piece of at most `most` steps that divides a round of `steps` evenly."""
    return max(d for d in range(1, min(most, steps) + 1) if steps % d == 0)


def _transformer_and_tokenizer(model: Transformer | LoadedModel) -> tuple[Transformer, Any]:
    if isinstance(model, Transformer):
        return model, None
    transformer = getattr(model, "transformer", None)
    if not isinstance(transformer, Transformer):
        raise UserError(f"expected a Transformer or what load_model returns, got {type(model).__name__}")
    return transformer, getattr(model, "tokenizer", None)


def _token_prompts(
    tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]], chat: bool | None
) -> list[list[int]]:
    """Token id lists, encoding string prompts with the model's tokenizer."""
    if isinstance(prompts, str):
        raise UserError("prompts must be a list (of strings or of token id lists), not one string")
    if not any(isinstance(p, str) for p in prompts):
        return [list(p) for p in prompts]
    if tokenizer is None:
        raise UserError("string prompts need a tokenizer: pass what load_model returns, or token id lists")
    if not all(isinstance(p, str) for p in prompts):
        raise UserError("prompts must be all strings or all token id lists")
    return encode_prompts(tokenizer, prompts, chat=has_chat_template(tokenizer) if chat is None else chat)


class TeacherForcedPiece(NamedTuple):
    """One piece of `teacher_forced_pieces`: row begin + i of logprobs (batch, width, vocab)
    predicts token begin + i + 1; cache is the cache after the piece, on the device: for a
    round's piece the one its rows read (after the round's eviction, with its tokens), for the
    prefill's piece the cache after the policy's prefill compaction. The next round donates it,
    so read it before taking the next piece."""

    begin: int
    logprobs: jax.Array
    cache: KVCache


def teacher_forced_pieces(
    model: Transformer | LoadedModel,
    tokens: np.ndarray,
    *,
    prefill_length: int,
    policy: KVPolicy = FullAttention(),
    divide_length: int = DEFAULT_DIVIDE_LENGTH,
    block: bool = True,
    mesh: Mesh | None = None,
) -> Iterator[TeacherForcedPiece]:
    """The log-probabilities `teacher_force` returns, piece by piece and left on the device
    (float32), with the cache they were computed with: the prefill's piece first, then one per
    round (`round_steps`), together covering every position of `tokens`. Everything is checked
    before the first piece is computed.
    """
    transformer, _ = _transformer_and_tokenizer(model)
    config = transformer.config
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise UserError(f"tokens must be a (batch, T) array of token ids, got shape {tokens.shape}")
    batch, total = tokens.shape
    if not 1 <= prefill_length <= total:
        raise UserError(f"prefill_length must be in [1, {total}], got {prefill_length}")
    if total > config.max_position_embeddings:
        raise UserError(f"sequence of {total} tokens exceeds the model's context of {config.max_position_embeddings}")
    if mesh is not None:
        sharding.check_batch(batch, mesh)
    policy.check(
        [prefill_length] * batch, divide_length, slim=transformer.slim, context_length=config.max_position_embeddings
    )
    steps = round_steps(policy, prefill_length, total - prefill_length, divide_length)
    num_slots = policy.num_slots(prompt_bucket(prefill_length), total - prefill_length, divide_length)
    _check_buffer_fits(transformer, batch, num_slots, mesh)
    return _pieces(transformer, tokens, prefill_length, policy, divide_length, block, mesh, steps, num_slots)


def _pieces(transformer, tokens, prefill_length, policy, divide_length, block, mesh, steps, num_slots):
    """`teacher_forced_pieces` once its arguments are checked (a generator runs only when iterated)."""
    batch, total = tokens.shape
    padded = np.zeros((batch, prompt_bucket(prefill_length)), np.int32)
    padded[:, :prefill_length] = tokens[:, :prefill_length]
    graphdef, state = split_model(transformer, mesh)
    padded, prompt_lengths = put_rows(mesh, padded, np.full(batch, prefill_length, np.int32))
    logits, cache = prefill(
        graphdef, state, policy, padded, prompt_lengths, num_slots=num_slots, all_logits=True, mesh=mesh
    )
    yield TeacherForcedPiece(0, jax.nn.log_softmax(logits[:, :prefill_length], axis=-1), cache)
    begin = prefill_length
    for length in steps:
        chunk = np.zeros((batch, length), np.int32)
        width = min(length, total - begin)
        chunk[:, :width] = tokens[:, begin : begin + width]
        positions = np.broadcast_to(np.arange(begin, begin + length, dtype=np.int32), (batch, length))
        chunk, positions = put_rows(mesh, chunk, positions)
        cache, logprobs = teacher_forced_round(
            graphdef,
            state,
            policy,
            cache,
            chunk,
            positions,
            prompt_lengths,
            divide_length=divide_length,
            block=block,
            mesh=mesh,
        )
        yield TeacherForcedPiece(begin, logprobs[:, :width], cache)
        begin += length


def teacher_force(
    model: Transformer | LoadedModel,
    tokens: np.ndarray,
    *,
    prefill_length: int,
    policy: KVPolicy = FullAttention(),
    divide_length: int = DEFAULT_DIVIDE_LENGTH,
    targets_only: bool = False,
    block: bool = True,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Log-probabilities of the next token at every position of `tokens` (batch, T).

    The first `prefill_length` tokens are prefilled; the rest run in the rounds generation runs
    (`round_steps`) with the same cache and eviction: each round as one block (`block`), or one
    token at a time through generation's decode step (see `teacher_forced_round`). Returns float32 (batch, T, vocab):
    row t is the distribution predicting token t + 1; with `targets_only`, (batch, T - 1): the
    log-probability of each actual next token (the vocabulary axis never reaches the host).
    `model` and `mesh` as in `generate`; `teacher_forced_pieces` keeps the pieces on the device.
    """
    pieces = teacher_forced_pieces(
        model, tokens, prefill_length=prefill_length, policy=policy, divide_length=divide_length, block=block, mesh=mesh
    )
    tokens = np.asarray(tokens, np.int32)
    # The next token at every position, 0 at the last (its log-prob is dropped).
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    host = []
    for begin, logprobs, _ in pieces:
        if targets_only:
            picked = jnp.asarray(targets[:, begin : begin + logprobs.shape[1]])
            logprobs = jnp.take_along_axis(logprobs, picked[..., None], axis=-1)[..., 0]
        host.append(sharding.to_host(logprobs))
    logprobs = np.concatenate(host, axis=1)
    return logprobs[:, :-1] if targets_only else logprobs
