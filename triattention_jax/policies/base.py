"""The interface every KV-cache policy implements.

A policy decides how many slots the buffer has and, between decode rounds inside the jitted
loop, which entries to keep. A new eviction policy is a new file defining a subclass and a
`register` call; nothing else changes.
"""

from __future__ import annotations

import abc
import dataclasses

from triattention_jax.cache import KVCache

_REGISTRY: dict[str, type["KVPolicy"]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVPolicy(abc.ABC):
    """Frozen and hashable: a policy is a static argument of the jitted decode round."""

    @abc.abstractmethod
    def num_slots(self, prompt_slots: int, max_new_tokens: int, divide_length: int) -> int:
        """Slots per (layer, row, KV head) for a prompt bucket and a generation length."""

    @abc.abstractmethod
    def before_round(self, cache: KVCache, divide_length: int) -> KVCache:
        """Runs inside jit before every round of `divide_length` steps; must leave room for it."""


def register(name: str, policy_class: type[KVPolicy]) -> None:
    _REGISTRY[name] = policy_class


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[KVPolicy]:
    from triattention_jax.errors import UserError

    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(policy_names())}")
    return _REGISTRY[name]
