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

_REGISTRY: dict[str, type[KVPolicy]] = {}


def array_field(**kwargs: Any) -> Any:
    """A dataclass field holding arrays: traced by jit rather than hashed."""
    return dataclasses.field(metadata={"array": True}, **kwargs)


def policy_dataclass(cls: type) -> type:
    """Frozen keyword-only dataclass, registered as a pytree (array fields are its data)."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if f.metadata.get("array")]
    meta = [f.name for f in fields if not f.metadata.get("array")]
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
        """Turns the prefilled prompt cache (one slot per prompt-bucket token) into the buffer."""

    def prefill_slots(self, prompt_slots: int, num_slots: int) -> int:
        """The buffer size `fit_prefill` returns: fixed-size buffers start at `num_slots`."""
        return num_slots

    def round_slots(self, num_slots: int, filled: int, divide_length: int, max_slots: int) -> int:
        """The buffer size for the next round (host side, between rounds): `num_slots` now,
        `filled` slots a cache that never evicts would hold, `max_slots` from `num_slots()`.
        Fixed-size buffers keep their size."""
        return num_slots

    @abc.abstractmethod
    def before_round(self, cache: KVCache, divide_length: int, context: RoundContext) -> KVCache:
        """Runs inside jit before every round of `divide_length` steps; must leave room for it."""


class EvictionPolicy(KVPolicy):
    """A buffer of budget + divide_length slots, cut back to `budget` whenever it fills.

    Subclasses score the slots; this class protects the prompt (when `protect_prompt`) and the
    last `window` positions, keeps the top-`budget` per (layer, row, KV head) (a stable sort
    by score), and stores the kept slots sorted by position. Expected fields: budget,
    protect_prompt, window.
    """

    budget: int
    protect_prompt: bool
    window: int

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
        whole_run = prompt_slots + -(-max_new_tokens // divide_length) * divide_length
        return min(self.budget + divide_length, whole_run)

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

    def compacting_rounds(self, prompt_slots: int, rounds: int, divide_length: int) -> list[int]:
        """Which of `rounds` decode rounds start with a compaction, after a prefill of
        `prompt_slots` slots: the same schedule as `fit_prefill` and `before_round`, on the host."""
        cursor = min(prompt_slots, self.budget)
        compacting = []
        for index in range(rounds):
            if cursor + divide_length > self.budget + divide_length:
                compacting.append(index)
                cursor = self.budget
            cursor += divide_length
        return compacting

    def fit_prefill(self, cache: KVCache, num_slots: int, context: RoundContext) -> KVCache:
        if cache.num_slots > self.budget:
            cache = self.compact(cache, context)
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


def register(name: str, policy_class: type[KVPolicy]) -> None:
    _REGISTRY[name] = policy_class


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[KVPolicy]:
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(policy_names())}")
    return _REGISTRY[name]
