"""Needle in a haystack: a pass key stated near the start, filler, then a question for it.

The stream is teacher-forced, so the score is how well the model predicts the key's tokens
after the question; with KV eviction that needs the fact to survive at least four full
budgets of filler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from triattention_jax.errors import UserError

FILLER_PER_BUDGET = 4
# Tokens set aside for everything but the filler (preamble, fact, question, answer).
RESERVED_TOKENS = 128
PREAMBLE = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it: "
    "you will be asked for it at the end.\n\n"
)
FACT = "The pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class NeedleStream:
    """tokens (length,) int32; fact and answer are [start, end) token spans; the filler runs
    from fact[1] to question_start."""

    tokens: np.ndarray
    fact: tuple[int, int]
    question_start: int
    answer: tuple[int, int]


def needle_key(sample: int) -> str:
    """A seven-digit pass key drawn from the sample index."""
    return str(np.random.default_rng(sample).integers(10**6, 10**7))


def needle_length(seq_len: int, budget: int) -> int:
    """Stream length: seq_len, or longer where the filler must cover four budgets."""
    return max(seq_len, FILLER_PER_BUDGET * budget + RESERVED_TOKENS)


def needle_stream(tokenizer: Any, key: str, filler: Sequence[int], length: int) -> NeedleStream:
    """Preamble, fact, filler (cut to make `length` tokens), question and the key as answer."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    head = list(tokenizer(PREAMBLE)["input_ids"])  # with the tokenizer's BOS, if it adds one
    fact = encode(FACT.format(key=key))
    question, answer = encode(QUESTION), encode(" " + key)
    # A leading space token predicts itself after "is": it belongs to the question, not the score.
    lead = next((i for i, t in enumerate(answer) if tokenizer.decode([t]).strip()), len(answer))
    question, answer = question + answer[:lead], answer[lead:]
    fixed = len(head) + len(fact) + len(question) + len(answer)
    if fixed > RESERVED_TOKENS:
        raise UserError(
            f"this tokenizer spells the needle's text in {fixed} tokens, more than the {RESERVED_TOKENS} the "
            "task reserves: raise RESERVED_TOKENS in triattention_jax/eval_tasks/needle.py"
        )
    fill = length - fixed
    if len(filler) < fill:
        raise UserError(
            f"the needle's filler text has {len(filler)} tokens, {fill} are needed: lower --seq_len or --budgets"
        )
    tokens = head + fact + list(filler[:fill]) + question + answer
    fact_end = len(head) + len(fact)
    question_start = fact_end + fill
    return NeedleStream(
        np.asarray(tokens, np.int32), (len(head), fact_end), question_start, (question_start + len(question), length)
    )


def needle_metrics(greedy: np.ndarray, stream: NeedleStream, positions: np.ndarray) -> dict[str, float]:
    """greedy (length,): the most likely token after each position (predicting token t + 1);
    positions (layers, kv_heads, slots): the positions cached when the answer's first token
    was predicted.
    Accuracy on the key's tokens, and fact_kept: the share of the fact's tokens still cached,
    averaged over the (layer, KV head) token sets (whether eviction or the reading failed)."""
    start, end = stream.answer
    correct = greedy[start - 1 : end - 1] == stream.tokens[start:end]
    fact_start, fact_end = stream.fact
    held = np.sum((positions >= fact_start) & (positions < fact_end), axis=-1)
    return {
        "answer_accuracy": float(correct.mean()),
        "exact_match": float(correct.all()),
        "fact_kept": float(held.mean() / (fact_end - fact_start)),
        "length": len(stream.tokens),
    }
