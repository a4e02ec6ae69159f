"""Long-context code completion: the start of a held-out Python source file, then its next lines.

Sample s reads one of the running Python's largest standard-library modules, of a rank below
`texts.FIT_FIRST_SOURCE` (triattention_fit is fitted on the ranks from there on, so no fitted
weights have seen these files), and cuts it at a line start after about `seq_len` tokens,
right before a line of code. The model continues the raw text (no chat template) greedily;
the first NUM_LINES non-blank lines it writes are compared with the file's own.
"""

from __future__ import annotations

import ast
import bisect
import dataclasses
import functools
from pathlib import Path
from typing import Any

from triattention_jax.errors import UserError
from triattention_jax.eval import texts

# Two lines: the issue asks for the "next lines", and a second line tests more than the
# completion of an obvious statement; a Python line is rarely over 30 tokens, so
# MAX_NEW_TOKENS covers both.
NUM_LINES = 2
MAX_NEW_TOKENS = 64
# A line to complete has at least this many non-space characters: shorter ones (`else:`,
# `return`, `pass`) are guessed without any context.
MIN_CODE_CHARS = 8
CLOSING = ")]},"


@dataclasses.dataclass(frozen=True)
class CodeSample:
    """name: the source file's name; cut: the character offset (a line start) where the prompt
    ends; tokens: the prompt, the file's text up to `cut` with the tokenizer's special tokens
    (at most seq_len ids); reference: the file's next NUM_LINES non-blank lines."""

    name: str
    cut: int
    tokens: list[int]
    reference: list[str]


def nonblank_lines(text: str, count: int = NUM_LINES) -> list[str]:
    """The first `count` lines of text that are not blank, as written (without line ends)."""
    return [line for line in text.split("\n") if line.strip()][:count]


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions of characters that turn a into b."""
    previous = list(range(len(b) + 1))  # distances of a[:i] to each prefix of b, row by row
    for i, char in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / the longer length, in [0, 1]; 1.0 for two empty strings."""
    longest = max(len(a), len(b))
    return 1.0 - levenshtein(a, b) / longest if longest else 1.0


def code_metrics(generated: str, reference: list[str]) -> dict[str, Any]:
    """The greedy continuation's first non-blank lines, as many as the reference has
    (NUM_LINES), against the reference's, each line stripped (indentation is the prompt's
    business): exact match of all of them and edit similarity of the lines joined; both sets of
    lines as written, for inspection."""
    prediction = nonblank_lines(generated, len(reference))
    stripped, truth = [line.strip() for line in prediction], [line.strip() for line in reference]
    return {
        "exact_match": float(stripped == truth),
        "edit_similarity": edit_similarity("\n".join(stripped), "\n".join(truth)),
        "prediction": "\n".join(prediction),
        "reference": "\n".join(reference),
    }


def is_code_line(line: str) -> bool:
    """A line worth completing: not blank, not a comment, not only closing brackets, at least
    MIN_CODE_CHARS non-space characters."""
    stripped = line.strip()
    return (
        not stripped.startswith("#")
        and bool(stripped.strip(CLOSING + " "))
        and len("".join(stripped.split())) >= MIN_CODE_CHARS
    )


def _docstring_rows(source: str) -> set[int]:
    """Line numbers (from 1) of the module's, classes' and functions' docstrings: prose, not
    code to complete."""
    rows: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                rows.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return rows


@functools.cache
def _source(path: Path) -> tuple[str, tuple[int, ...]]:
    """A source file's text and the offsets where a prompt may end: line starts (not the
    file's start) before a code line outside docstrings with NUM_LINES non-blank lines from
    there on."""
    text = path.read_text(errors="replace")
    docstrings = _docstring_rows(text)
    lines = text.split("\n")
    starts, nonblank = [0], [0]  # per line: its offset, and the non-blank lines before it
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
        nonblank.append(nonblank[-1] + bool(line.strip()))
    cuts = tuple(
        starts[i]
        for i, line in enumerate(lines)
        if i > 0 and i + 1 not in docstrings and is_code_line(line) and nonblank[-1] - nonblank[i] >= NUM_LINES
    )
    return text, cuts


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _fits(tokenizer: Any, path: Path, seq_len: int) -> bool:
    """Whether the file runs past seq_len tokens and has a cut within them."""
    text, cuts = _source(path)
    return (
        bool(cuts)
        and len(texts.text_tokens(tokenizer, text, seq_len + 1)) > seq_len
        and _token_count(tokenizer, text[: cuts[0]]) <= seq_len
    )


def code_files(tokenizer: Any, seq_len: int) -> list[Path]:
    """The files samples read, largest first: standard-library sources of a rank below
    FIT_FIRST_SOURCE (never the fitting texts) that run past seq_len tokens with a line of code
    to complete within them. None is a `UserError` naming the --seq_len range that has some."""
    held_out = texts.stdlib_sources()[: texts.FIT_FIRST_SOURCE]
    files = [f for f in held_out if _fits(tokenizer, f, seq_len)]
    if not files:
        parsed = [_source(f) for f in held_out]
        shortest = min(_token_count(tokenizer, text[: cuts[0]]) for text, cuts in parsed if cuts)
        longest = max(_token_count(tokenizer, text) for text, _ in parsed) - 1
        raise UserError(
            f"no held-out standard-library source (the {len(held_out)} largest, which triattention_fit never fits "
            f"on) runs past --seq_len {seq_len} tokens with a line of code to complete within them: choose "
            f"--seq_len between {shortest} and {longest}"
        )
    return files


def code_sample(tokenizer: Any, files: list[Path], sample: int, seq_len: int) -> CodeSample:
    """Sample s: file s mod len(files) (`code_files`), cut at its last line of code whose prompt
    has at most seq_len tokens, or, each time s wraps around the files, one such line earlier."""
    path = files[sample % len(files)]
    text, cuts = _source(path)
    # Prompts grow with the cut, so the cuts that fit are a prefix of them.
    fitting = bisect.bisect_right(cuts, seq_len, key=lambda cut: _token_count(tokenizer, text[:cut]))
    cut = cuts[fitting - 1 - (sample // len(files)) % fitting]
    return CodeSample(path.name, cut, list(tokenizer(text[:cut])["input_ids"]), nonblank_lines(text[cut:]))
