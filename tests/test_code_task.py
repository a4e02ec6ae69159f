"""The long-context code task: its scoring, where its prompts are cut, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from triattention_jax.errors import UserError
from triattention_jax.eval import texts
from triattention_jax.eval.tasks.code import (
    NUM_LINES,
    code_files,
    code_metrics,
    code_sample,
    edit_similarity,
    is_code_line,
    levenshtein,
    nonblank_lines,
)

BOS = 1


class CharTokenizer:
    """One token per character, after a BOS: token counts are character counts plus one."""

    def __call__(self, text: str, **kwargs) -> dict[str, list[int]]:
        return {"input_ids": [BOS] + [ord(c) for c in text]}


def test_levenshtein_and_edit_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("ab", "ba") == 2  # no transpositions
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("same", "same") == 0
    # One substitution in four characters: 0.8 if divided by length + 1, 0.5 with one edit too many.
    assert edit_similarity("abcd", "abce") == 0.75
    assert edit_similarity("abc", "") == 0.0
    assert edit_similarity("", "") == 1.0


def test_lines_and_metrics():
    assert nonblank_lines("\n  \nfoo\n\n  bar\nbaz\n", 2) == ["foo", "  bar"]
    assert nonblank_lines("only\n\n", 2) == ["only"]
    reference = ["    x = 1", "    y = 2"]
    # Indentation and blank lines between do not count; a third line is not read.
    same = code_metrics("x = 1\n\n        y = 2   \nz = 3", reference)
    assert same == {
        "exact_match": 1.0,
        "edit_similarity": 1.0,
        "prediction": "x = 1\n        y = 2   ",
        "reference": "    x = 1\n    y = 2",
    }
    # "x = 1\ny = 3" against "x = 1\ny = 2": one substitution in 11 characters.
    wrong = code_metrics("x = 1\ny = 3\n", reference)
    assert wrong["exact_match"] == 0.0 and wrong["edit_similarity"] == pytest.approx(1 - 1 / 11)
    # One line of two: "\ny = 2" (6 characters) is missing.
    short = code_metrics("x = 1", reference)
    assert short["exact_match"] == 0.0 and short["edit_similarity"] == pytest.approx(5 / 11)


def test_code_lines():
    assert is_code_line("    total = first + second")
    assert is_code_line("return xy")  # eight non-space characters
    assert not is_code_line("return x")  # seven
    assert not is_code_line("   ")
    assert not is_code_line("    # a comment about the code below")
    assert not is_code_line("        })]")


def _module(functions: int) -> str:
    parts = ['"""A module docstring\nover two lines."""\n', "import os\n"]
    for i in range(functions):
        parts.append(
            f"\n\ndef function_{i}(argument):\n"
            f'    """Documentation of function_{i}."""\n'
            "    # a comment\n"
            f"    value = argument * {i} + os.sep.count('/')\n"
            "\n"
            f"    return value - {i}\n"
        )
    return "".join(parts)


@pytest.fixture
def sources(tmp_path, monkeypatch) -> list[Path]:
    """Five source files by rank: 0 and 2 long, 1 too short, 3 and 4 (the longest) fitting texts."""
    files = []
    for rank, functions in enumerate([40, 1, 30, 80, 80]):
        path = tmp_path / f"rank{rank}.py"
        path.write_text(_module(functions))
        files.append(path)
    monkeypatch.setattr(texts, "stdlib_sources", lambda: files)
    monkeypatch.setattr(texts, "FIT_FIRST_SOURCE", 3)
    return files


def test_prompts_end_at_a_line_before_code(sources):
    seq_len = 1000
    tokenizer = CharTokenizer()
    files = code_files(tokenizer, seq_len)
    assert files == [sources[0], sources[2]]  # rank 1 is too short, ranks 3 and 4 are for fitting
    samples = [code_sample(tokenizer, files, s, seq_len) for s in range(6)]
    assert [s.name for s in samples] == ["rank0.py", "rank2.py"] * 3
    for sample in samples:
        text = Path(sources[int(sample.name[4])]).read_text()
        prompt, rest = text[: sample.cut], text[sample.cut :]
        assert prompt.endswith("\n")
        assert sample.tokens == [BOS] + [ord(c) for c in prompt]
        # The last line of code that fits, a function (about 130 characters) at most before the limit.
        assert seq_len - 150 <= len(sample.tokens) <= seq_len
        lines = [line for line in rest.split("\n") if line.strip()]
        assert len(sample.reference) == NUM_LINES and sample.reference == lines[:NUM_LINES]
    # Every cut comes right before code: neither a comment nor a docstring.
    for limit in range(100, 2000, 10):
        reference = code_sample(tokenizer, files, 0, limit).reference
        assert reference[0].lstrip().startswith(("value", "return", "def", "import")), reference
    # A sample that wraps around the files cuts its file one line of code earlier.
    assert samples[2].cut < samples[0].cut and samples[4].cut < samples[2].cut
    assert samples[2].reference != samples[0].reference


def test_no_file_long_enough_is_a_user_error(sources):
    with pytest.raises(UserError, match="choose --seq_len between"):
        code_files(CharTokenizer(), 10**6)


def test_real_sources_are_held_out():
    held_out = {f.name for f in texts.stdlib_sources()[: texts.FIT_FIRST_SOURCE]}
    chosen = {f.name for f in code_files(CharTokenizer(), 20_000)}
    assert chosen and chosen <= held_out


def test_code_run(tmp_path):
    from conftest import WIDE, random_transformer

    from triattention_jax.checkpoints.store import LoadedModel, resolve_model_dir
    from triattention_jax.checkpoints.tokenizer import load_tokenizer
    from triattention_jax.eval.runner import evaluate

    tokenizer = load_tokenizer(resolve_model_dir("smollm2-135m-instruct"))
    transformer = random_transformer({**WIDE, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id})
    model = LoadedModel(
        config=transformer.config, transformer=transformer, tokenizer=tokenizer, path=tmp_path, name="tiny-random"
    )
    out = tmp_path / "code"
    paths = evaluate(model, task="code", methods=["streaming"], budgets=[64], num_samples=2, seq_len=256, out=out)
    cells = json.loads((out / "results.json").read_text())
    assert sorted(cells) == ["code/full/64/0", "code/full/64/1", "code/streaming/64/0", "code/streaming/64/1"]
    for cell in cells.values():
        assert 0.0 <= cell["exact_match"] <= 1.0 and 0.0 <= cell["edit_similarity"] <= 1.0
        assert cell["reference"].count("\n") == NUM_LINES - 1 and cell["prompt_tokens"] <= 256
    assert cells["code/full/64/0"]["input"] == cells["code/streaming/64/0"]["input"]
    assert all(p.exists() for p in paths)
    assert "| full | 64 |" in (out / "code.md").read_text() and (out / "code_edit_similarity.png").exists()
