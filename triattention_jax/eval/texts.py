"""The evaluation's inputs: long texts from the running Python's standard library (its source
files and the pydoc topics) and the model's own reasoning-style answers, cut into token
sequences."""

from __future__ import annotations

import pydoc_data.topics
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.decoding import generate
from triattention_jax.errors import UserError
from triattention_jax.prompts import encode_prompts, has_chat_template

PREFILL_TOKENS = 64
REASONING_PROMPTS = (
    "Solve step by step: a shop sells pencils at 3 for 2 dollars. How much do 45 pencils cost?",
    "Explain, step by step, why the square root of 2 is irrational.",
    "A tank fills in 6 hours with pipe A and 9 hours with pipe B. How long with both? Show your reasoning.",
    "List the prime numbers below 60 and explain how you checked each one.",
)
SOURCES = ("python_source", "pydoc_prose", "self_generated")


def source_text(source: str, sample: int) -> str:
    """Long text by index: a stdlib source file or all pydoc topics from a rotating start."""
    if source == "python_source":
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.stat().st_size, reverse=True)
        return files[sample % len(files)].read_text(errors="replace")
    topics = sorted(pydoc_data.topics.topics)
    start = (sample * 7) % len(topics)
    return "\n\n".join(pydoc_data.topics.topics[t] for t in topics[start:] + topics[:start])


def text_tokens(tokenizer: Any, text: str, count: int, **kwargs: Any) -> list[int]:
    """The first `count` tokens of text (all of them if fewer), tokenizing only a prefix:
    sources run to hundreds of kilobytes."""
    chars = 8 * count
    while True:
        ids = tokenizer(text[:chars], **kwargs)["input_ids"]
        # One token more than asked for, so the word cut at the prefix's end is not kept.
        if len(ids) > count or chars >= len(text):
            return list(ids[:count])
        chars *= 2


def fidelity_tokens(model: LoadedModel, samples: list[int], seq_len: int) -> np.ndarray:
    """(len(samples), seq_len) tokens, each sample's source chosen by its index; the
    self-generated ones come from one batched generation."""
    generated = [s for s in samples if SOURCES[s % len(SOURCES)] == "self_generated"]
    rows = {
        s: text_tokens(model.tokenizer, source_text(SOURCES[s % len(SOURCES)], s // len(SOURCES)), seq_len)
        for s in samples
        if s not in generated
    }
    if generated:
        prompts = encode_prompts(
            model.tokenizer,
            [REASONING_PROMPTS[s // 3 % len(REASONING_PROMPTS)] for s in generated],
            chat=has_chat_template(model.tokenizer),
        )
        answers = generate(
            model.transformer, prompts, eos_ids=(), max_new_tokens=seq_len - min(map(len, prompts))
        ).token_ids
        rows |= {s: (prompt + answer)[:seq_len] for s, prompt, answer in zip(generated, prompts, answers)}
    for sample in samples:
        if len(rows[sample]) < seq_len:
            raise UserError(
                f"sample {sample} ({SOURCES[sample % len(SOURCES)]}) has only {len(rows[sample])} tokens, "
                f"fewer than --seq_len {seq_len}"
            )
    return np.asarray([rows[s] for s in samples], np.int32)
