"""The evaluation's inputs: long texts from the running Python's standard library (its source
files and the pydoc topics) and the model's own reasoning-style answers, cut into token
sequences; or the user's own text files (`--text_file`)."""

from __future__ import annotations

import dataclasses
import hashlib
import pydoc_data.topics
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH
from triattention_jax.decoding import generate
from triattention_jax.errors import UserError
from triattention_jax.prompts import encode_prompts, has_chat_template

PREFILL_TOKENS = 64
# A teacher-forced user text must reach past the prefill and one whole round, where the first
# eviction can come, by one prediction.
MIN_TEXT_TOKENS = PREFILL_TOKENS + DEFAULT_DIVIDE_LENGTH + 2
REASONING_PROMPTS = (
    "Solve step by step: a shop sells pencils at 3 for 2 dollars. How much do 45 pencils cost?",
    "Explain, step by step, why the square root of 2 is irrational.",
    "A tank fills in 6 hours with pipe A and 9 hours with pipe B. How long with both? Show your reasoning.",
    "List the prime numbers below 60 and explain how you checked each one.",
)
SOURCES = ("python_source", "pydoc_prose", "self_generated")


# triattention_fit's code texts (`fit_documents`): standard-library source files from this rank
# on (largest first). python_source samples take ranks from 0 (sample // 3), so they reach these
# only past 3 * FIT_FIRST_SOURCE samples, and `evaluate` refuses a study where they would.
FIT_FIRST_SOURCE = 40


def stdlib_sources() -> list[Path]:
    """The running Python's standard-library modules, largest first."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.stat().st_size, reverse=True)


def document_name(source: str, index: int) -> str:
    """The document the `index`-th text of `source` comes from (sample s reads index
    s // len(SOURCES) of SOURCES[s % len(SOURCES)]), named as `fit_documents` names its own."""
    if source == "python_source":
        files = stdlib_sources()
        return f"python_source/{files[index % len(files)].name}"
    if source == "self_generated":
        return f"self_generated/{index % len(REASONING_PROMPTS)}"
    return source


def fit_documents(tokenizer: Any, count: int, seq_len: int, *, skip: int = 0) -> list[tuple[str, list[int]]]:
    """`count` standard-library source files for fitting, never evaluation texts (see
    FIT_FIRST_SOURCE), after the first `skip` of them: (document name, its first `seq_len` tokens)."""
    first = FIT_FIRST_SOURCE + skip
    files = stdlib_sources()[first : first + count]
    return [(f"python_source/{f.name}", text_tokens(tokenizer, f.read_text(errors="replace"), seq_len)) for f in files]


def source_text(source: str, sample: int) -> str:
    """Long text by index: a stdlib source file or all pydoc topics from a rotating start."""
    if source == "python_source":
        files = stdlib_sources()
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


@dataclasses.dataclass(frozen=True)
class TextFile:
    """A user's text (`--text_file`): the path as given, its text, the SHA-256 of its bytes."""

    path: str
    text: str
    sha256: str


def read_text_files(paths: Sequence[str]) -> list[TextFile]:
    """Each file read as UTF-8 text; one that is missing, unreadable, not UTF-8 or empty is a
    `UserError` naming it (checked before the model is loaded)."""
    files = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            what = "is a folder" if file.is_dir() else "does not exist"
            raise UserError(f"--text_file {path} {what}: give the path of a UTF-8 text file")
        try:
            data = file.read_bytes()
        except OSError as e:
            raise UserError(
                f"cannot read --text_file {path} ({e.strerror}): make it readable or give another file"
            ) from e
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(
                f"--text_file {path} is not UTF-8 text (at byte {e.start}): save it as UTF-8 or give another file"
            ) from e
        if not text.strip():
            raise UserError(f"--text_file {path} is empty: give a file with text")
        files.append(TextFile(path, text, hashlib.sha256(data).hexdigest()))
    return files


def text_file_samples(model: LoadedModel, files: Sequence[TextFile], task: str, seq_len: int) -> list[list[int]]:
    """The samples a study takes from the user's files, in order (sample i is the i-th).

    fidelity: each file cut into consecutive sequences of `seq_len` tokens (a shorter
    remainder is left out), each starting with the special tokens the tokenizer puts before a
    text (BOS where the model has one), as the built-in texts do. divergence: each file whole,
    tokenized the same way, is a prompt the model continues for `seq_len` tokens. A file that
    gives no sample, or a prompt too long for the model's context, is a `UserError` naming it.
    """
    tokenizer = model.tokenizer
    start = list(tokenizer("")["input_ids"])
    if task == "divergence":
        context = model.config.max_position_embeddings
        prompts = []
        for file in files:
            prompt = start + list(tokenizer(file.text, add_special_tokens=False)["input_ids"])
            if len(prompt) + seq_len > context:
                raise UserError(
                    f"--text_file {file.path} has {len(prompt)} tokens, and with --seq_len {seq_len} generated "
                    f"tokens it exceeds the model's context of {context}: shorten the text or lower --seq_len"
                )
            prompts.append(prompt)
        return prompts
    if seq_len < MIN_TEXT_TOKENS:
        raise UserError(
            f"--seq_len {seq_len} is too short for --text_file samples: raise it to at least {MIN_TEXT_TOKENS} "
            f"(the {PREFILL_TOKENS}-token prefill, one {DEFAULT_DIVIDE_LENGTH}-token round and a prediction after it)"
        )
    body = seq_len - len(start)
    samples = []
    for file in files:
        ids = list(tokenizer(file.text, add_special_tokens=False)["input_ids"])
        if len(start) + len(ids) < MIN_TEXT_TOKENS:
            raise UserError(
                f"--text_file {file.path} has {len(start) + len(ids)} tokens, too few for the {PREFILL_TOKENS}-token "
                f"prefill, one {DEFAULT_DIVIDE_LENGTH}-token round and a prediction after it: give a text of at "
                f"least {MIN_TEXT_TOKENS} tokens"
            )
        if len(start) + len(ids) < seq_len:
            raise UserError(
                f"--text_file {file.path} has {len(start) + len(ids)} tokens, fewer than --seq_len {seq_len}: lower "
                f"--seq_len to {len(start) + len(ids)} or give a longer text"
            )
        samples += [start + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]
    return samples
