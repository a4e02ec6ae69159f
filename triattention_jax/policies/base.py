"""The interface every KV-cache policy implements, and the shared eviction mechanics.

A policy decides how many slots the buffer has and, inside the jitted loop, which entries to
keep. Policies are frozen dataclasses registered as pytrees: arrays (calibration statistics)
are traced data, everything else is static and part of the compiled function's identity.
A new eviction policy is a new file: an `EvictionPolicy` subclass that implements `scores`,
decorated with `@policy_dataclass` and passed to `register`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from triattention_jax.cache import EMPTY_POSITION, KVCache
from triattention_jax.errors import UserError
from triattention_jax.scoring import AGGREGATIONS

_REGISTRY: dict[str, type[KVPolicy]] = {}


def array_field(**kwargs: Any) -> Any:
    """A dataclass field holding arrays: traced by jit rather than hashed."""
    return dataclasses.field(metadata={"array": True}, **kwargs)


def _setting_names(cls: type) -> list[str]:
    """A policy dataclass's fields that are not arrays: its settings, static under jit."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("array")]


def policy_dataclass(cls: type) -> type:
    """Frozen keyword-only dataclass, registered as a pytree (array fields are its data)."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    meta = _setting_names(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundContext:
    """What a policy may look at besides the cache.

    prompt_lengths: (batch,) prompt tokens per row (positions below are prompt tokens).
    position: (batch,) t0, the number of tokens processed so far (the next token's position).
    """

    prompt_lengths: jax.Array
    position: jax.Array


class KVPolicy(abc.ABC):
    """What the decode loop calls; see `FullAttention` and `EvictionPolicy`.

    `observes` names what a policy needs from each forward pass ("queries", pre-RoPE;
    "rope_queries"; "attention"); the model computes those only for policies that ask.
    """

    observes: ClassVar[frozenset[str]] = frozenset()
    # Whether `before_round` may change the cache (full attention's never does).
    evicts: ClassVar[bool] = True

    @abc.abstractmethod
    def num_slots(self, prompt_slots: int, max_new_tokens: int, divide_length: int) -> int:
        """Slots per (layer, row, KV head) for a prompt bucket and a generation length."""

    def settings(self) -> dict[str, Any]:
        """The settings this policy decodes with (its fields that are not arrays), for reports:
        what a fit file or a method's defaults filled in, not only what the user gave."""
        return {name: getattr(self, name) for name in _setting_names(type(self))}

    def check(  # noqa: B027 - a policy without requirements accepts every run
        self,
        prompt_lengths: Sequence[int],
        divide_length: int,
        *,
        slim: bool = False,
        context_length: int | None = None,
    ) -> None:
        """Raises `UserError` when the settings cannot be met for these prompts (slim: with a
        K-only cache, where every head of a layer must keep the same tokens; context_length:
        the model's, which no budget needs to exceed)."""

    def start(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        """Sets up the policy's slot_stats/state after the prompt was appended (out: its `ExtendOutput`)."""
        return cache

    def observe(self, cache: KVCache, out: Any, positions: jax.Array) -> KVCache:
        """Updates slot_stats/state after a decode step appended its token."""
        return cache

    @abc.abstractmethod
    def fit_prefill(self, cache: KVCache, num_slots: int, context: RoundContext) -> KVCache:
        """Turns the prefilled prompt cache (one slot per prompt-bucket token) into the buffer
        of `num_slots` that decoding keeps to the end."""

    def prefill_cursor(self, prompt_tokens: int, prompt_slots: int) -> int:
        """The cursor `fit_prefill` leaves (host side), after a longest prompt of
        `prompt_tokens` tokens right-padded to `prompt_slots`: by default every bucket slot."""
        return prompt_slots

    def first_round_steps(self, prefill_cursor: int, divide_length: int) -> int:
        """The steps of the first decode round. Eviction happens only between rounds, so this
        sets their phase; the later rounds are `divide_length` long. By default whole rounds
        from the start of decoding."""
        return divide_length

    def round_steps(self, prompt_tokens: int, prompt_slots: int, new_tokens: int, divide_length: int) -> list[int]:
        """The steps of every decode round that together cover `new_tokens` (the last may run
        past them): `first_round_steps`, then whole rounds. Host side, known before decoding."""
        if new_tokens < 1:
            return []
        first = self.first_round_steps(self.prefill_cursor(prompt_tokens, prompt_slots), divide_length)
        return [first] + [divide_length] * -(-max(0, new_tokens - first) // divide_length)

    @abc.abstractmethod
    def before_round(self, cache: KVCache, divide_length: int, context: RoundContext) -> KVCache:
        """Runs inside jit before every round (`divide_length` steps, the first round
        possibly fewer: `first_round_steps`); must leave room for `divide_length` more."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvictionPolicy(KVPolicy):
    """A buffer of budget + divide_length slots, cut back to `budget` whenever it fills.

    Subclasses score the slots; this class protects the prompt (when `protect_prompt`) and the
    last `window` positions, keeps the top-`budget` per (layer, row, KV head) (a stable sort
    by score), and stores the kept slots sorted by position. Subclasses declare budget,
    protect_prompt and window again with their defaults; they inherit slack_trigger.

    Schedule: compactions happen between rounds, when the next round would not fit. By default
    rounds are whole from the start of decoding and the prompt bucket's padding slots count
    toward the buffer, so a compaction comes at the first round boundary past `budget`.
    `slack_trigger` reproduces the official implementation's `use_slack_trigger` (with
    `count_prompt_tokens`): a compaction exactly when the buffer holds budget + divide_length
    tokens, after the same decode steps as there. The padding slots are given back after
    prefill (the cursor starts at the longest prompt's end, where the official cache ends) and
    the first round is cut short, so that every round boundary falls where the cursor reaches
    budget + divide_length (SPEC 5). The steps match for prompts within the budget; a longer
    one is compacted here at prefill, there once the cache holds budget + divide_length.
    """

    budget: int
    protect_prompt: bool
    window: int
    slack_trigger: bool = False

    @classmethod
    def default_protect_prompt(cls) -> bool:
        return {f.name: f.default for f in dataclasses.fields(cls)}["protect_prompt"]

    @classmethod
    def default_window(cls, budget: int) -> int:
        """The recent tokens protected when nothing says otherwise: the method's own default."""
        return {f.name: f.default for f in dataclasses.fields(cls)}["window"]

    @abc.abstractmethod
    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        """Importance of every slot, float32 (layers, batch, kv_heads, slots); invalid slots are ignored."""

    def num_slots(self, prompt_slots: int, max_new_tokens: int, divide_length: int) -> int:
        """budget + divide_length, or fewer when the whole run fits (then nothing is evicted)."""
        # A first round cut short (slack_trigger) adds a round: room for one more.
        rounds = -(-max_new_tokens // divide_length) + self.slack_trigger
        return min(self.budget + divide_length, prompt_slots + rounds * divide_length)

    def prefill_cursor(self, prompt_tokens: int, prompt_slots: int) -> int:
        return min(prompt_tokens if self.slack_trigger else prompt_slots, self.budget)

    def first_round_steps(self, prefill_cursor: int, divide_length: int) -> int:
        """With slack_trigger: the steps until the cursor reaches budget + divide_length (or
        a whole round when a boundary falls there already); every later boundary then does
        too, since the cursor grows by whole rounds and is cut back to `budget`."""
        if not self.slack_trigger:
            return divide_length
        return (self.budget - prefill_cursor) % divide_length or divide_length

    def check(
        self,
        prompt_lengths: Sequence[int],
        divide_length: int,
        *,
        slim: bool = False,
        context_length: int | None = None,
    ) -> None:
        if self.budget < 1:
            raise UserError(f"budget must be at least 1, got {self.budget}")
        if context_length is not None and self.budget > context_length:
            raise UserError(
                f"budget {self.budget} exceeds the model's context of {context_length} tokens: lower --budget"
            )
        if not 0 <= self.window < self.budget:
            raise UserError(f"window must be in [0, budget={self.budget}), got {self.window}")
        longest = max(prompt_lengths)
        if self.protect_prompt and longest + self.window > self.budget:
            raise UserError(
                f"a prompt of {longest} tokens (plus window {self.window}) does not fit budget {self.budget} with the "
                "prompt protected: raise --budget or pass --protect_prompt=false to compress the prompt"
            )

    def compacting_rounds(
        self, prompt_tokens: int, prompt_slots: int, new_tokens: int, divide_length: int
    ) -> list[int]:
        """Which rounds of `round_steps(...)` start with a compaction, after a longest prompt
        of `prompt_tokens` tokens in a bucket of `prompt_slots`: the same schedule as
        `fit_prefill` and `before_round`, on the host."""
        cursor = self.prefill_cursor(prompt_tokens, prompt_slots)
        compacting = []
        for index, steps in enumerate(self.round_steps(prompt_tokens, prompt_slots, new_tokens, divide_length)):
            if cursor > self.budget:  # before_round: cursor + divide_length > budget + divide_length
                compacting.append(index)
                cursor = self.budget
            cursor += steps
        return compacting

    def fit_prefill(self, cache: KVCache, num_slots: int, context: RoundContext) -> KVCache:
        if cache.num_slots > self.budget:
            cache = self.compact(cache, context)
        if self.slack_trigger:
            # Slots past the longest prompt hold padding in every row (after a compaction too:
            # kept slots are sorted by position, empty ones last), so the cursor goes back to
            # it: the buffer then counts tokens, as the official cache does.
            cache = dataclasses.replace(cache, cursor=jnp.minimum(cache.cursor, jnp.max(context.prompt_lengths)))
        return cache.resized(num_slots)

    def before_round(self, cache: KVCache, divide_length: int, context: RoundContext) -> KVCache:
        full = cache.cursor + divide_length > cache.num_slots
        return jax.lax.cond(full, lambda c: self.compact(c, context, in_place=True), lambda c: c, cache)

    def selection_scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        """`scores` with protection applied: +inf for protected slots, −inf for empty ones."""
        positions = cache.stacked("pos")
        valid = positions != EMPTY_POSITION
        scores = self.scores(cache, context).astype(jnp.float32)
        protected = jnp.zeros_like(valid)
        if self.protect_prompt:
            protected |= positions < context.prompt_lengths[None, :, None, None]
        if self.window:
            protected |= positions >= (context.position - self.window)[None, :, None, None]
        scores = jnp.where(valid, jnp.where(protected, jnp.inf, scores), -jnp.inf)
        if any(cache.key_only_layers):
            # A K-only layer recomputes each head's V from every head's K of the slot, so all
            # its heads keep one token set: the max over KV heads (slots hold the same token
            # in every head, so validity and protection agree across heads).
            shared = jnp.broadcast_to(jnp.max(scores, axis=2, keepdims=True), scores.shape)
            scores = jnp.where(jnp.asarray(cache.key_only_layers)[:, None, None, None], shared, scores)
        return scores

    def compact(self, cache: KVCache, context: RoundContext, *, in_place: bool = False) -> KVCache:
        """Keeps the top-`budget` slots per (layer, row, KV head), sorted by position (in_place:
        in the first `budget` slots of the same buffer, see `KVCache.gather`)."""
        # A stable sort rather than `lax.top_k`: XLA partitions a sort along the other axes of a
        # sharded cache, while top_k gathers the scores of every shard first. Ties keep the
        # lower slot, as top_k does.
        kept = jnp.argsort(-self.selection_scores(cache, context), axis=3, stable=True)[..., : self.budget]
        kept_pos = jnp.take_along_axis(cache.stacked("pos"), kept, axis=3)
        order = jnp.argsort(jnp.where(kept_pos == EMPTY_POSITION, np.iinfo(np.int32).max, kept_pos), axis=3)
        return cache.gather(jnp.take_along_axis(kept, order, axis=3), in_place=in_place)


def check_aggregation(aggregation: str) -> None:
    """Refuses a token-set aggregation that `scoring.aggregate` does not know."""
    if aggregation not in AGGREGATIONS:
        raise UserError(f"unknown aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")


def check_offsets(offsets: Sequence[int]) -> None:
    """Refuses future distances a score cannot average over: none, or a negative one."""
    if not offsets or min(offsets) < 0:
        raise UserError(f"offsets must be a non-empty list of non-negative distances, got {offsets}")


def check_slim_selection(aggregation: str, slim: bool) -> None:
    """A K-only layer recomputes each head's V from all heads' K: its heads keep one token set."""
    if slim and aggregation != "per_layer":
        raise UserError(
            "--kv_cache slim recomputes each head's V from all heads' K, so every head of a layer must keep "
            f"the same tokens: pass --aggregation per_layer (got {aggregation})"
        )


def register(name: str, policy_class: type[KVPolicy]) -> None:
    # Reports list a policy's settings from its dataclass fields (`KVPolicy.settings`).
    if not dataclasses.is_dataclass(policy_class):
        raise TypeError(f"{policy_class.__name__} must be a dataclass (policy_dataclass) to be registered")
    _REGISTRY[name] = policy_class


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[KVPolicy]:
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(policy_names())}")
    return _REGISTRY[name]


def sink_keys(positions: jax.Array, n_sink: int) -> jax.Array:
    """The filled slots among the first `n_sink` positions: attention sinks, kept whatever they
    score by the policies that keep sinks. positions of any shape."""
    return (positions != EMPTY_POSITION) & (positions < n_sink)


# R-KV's cosine above which two cached keys count as copies of each other (SPEC 6).
SIMILARITY_THRESHOLD = 0.5


def key_redundancy(keys: jax.Array, positions: jax.Array, similarity_threshold: float) -> jax.Array:
    """R-KV's redundancy of one layer's cached keys: per key, a softmax over the valid keys of
    its mean cosine similarity to the others, where for each key the most recent other key
    highly similar to it (cosine above `similarity_threshold`) does not count, so the newest
    copy of a repeated key is the one kept. Query-free.

    keys: (batch, kv_heads, slots, head_dim), as cached (post-RoPE); positions: (batch,
    kv_heads, slots). Returns (batch, kv_heads, slots), 0 on empty slots."""
    ok = positions != EMPTY_POSITION
    keys = keys.astype(jnp.float32)
    unit = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True), 1e-6)
    similarity = jnp.einsum("bksd,bktd->bkst", unit, unit)
    pair = ok[..., :, None] & ok[..., None, :] & ~jnp.eye(keys.shape[2], dtype=bool)
    similarity = jnp.where(pair, similarity, 0.0)
    similar = similarity > similarity_threshold
    newest = jnp.argmax(jnp.where(similar, positions[..., None, :], -1), axis=-1)  # per row: newest similar key
    has_similar = jnp.any(similar, axis=-1)
    protect = (jnp.arange(keys.shape[2]) == newest[..., None]) & has_similar[..., None]
    similarity = jnp.where(protect, 0.0, similarity)
    rows = jnp.maximum(jnp.sum(ok, axis=-1, keepdims=True), 1)
    column_mean = jnp.sum(similarity, axis=-2) / rows
    return jax.nn.softmax(jnp.where(ok, column_mean, -jnp.inf), axis=-1)


def with_sinks_kept(scores: jax.Array, positions: jax.Array, n_sink: int) -> jax.Array:
    """`scores` with the sinks (`sink_keys`) at +inf, so always kept, and empty slots at −inf."""
    return jnp.where(sink_keys(positions, n_sink), jnp.inf, jnp.where(positions == EMPTY_POSITION, -jnp.inf, scores))


def last_prompt_entries(
    values: jax.Array, positions: jax.Array, count: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """The last `count` real prompt tokens of each right-padded row: values (layers, batch, T,
    ...) -> (layers, batch, count, ...) in `dtype`, and their positions (batch, count), marked
    EMPTY_POSITION where a row's prompt is shorter than `count`."""
    lengths = jnp.sum(positions >= 0, axis=1)
    index = lengths[:, None] - count + jnp.arange(count)[None]
    gather = jnp.clip(index, 0, positions.shape[1] - 1)
    taken = jnp.take_along_axis(values, gather.reshape((1, *gather.shape) + (1,) * (values.ndim - 3)), axis=2)
    taken_positions = jnp.where(index >= 0, jnp.take_along_axis(positions, gather, axis=1), EMPTY_POSITION)
    return taken.astype(dtype), taken_positions


def slide_window(
    values: jax.Array, positions: jax.Array, new_values: jax.Array, new_positions: jax.Array, count: int
) -> tuple[jax.Array, jax.Array]:
    """The last `count` entries after appending T >= 1 new ones (one decode step, or a
    teacher-forced round at once): values along axis 2, positions along axis 1."""
    values = jnp.concatenate([values, new_values.astype(values.dtype)], axis=2)
    positions = jnp.concatenate([positions, new_positions], axis=1)
    return values[:, :, -count:], positions[:, -count:]
