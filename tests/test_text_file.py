"""`evaluate --text_file`: the user's own texts as fidelity sequences and divergence prompts,
their fingerprints in the results folder's settings, and one clear line for each bad file."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from triattention_jax.errors import UserError
from triattention_jax.eval.runner import evaluate
from triattention_jax.eval.store import ResultStore
from triattention_jax.eval.texts import MIN_TEXT_TOKENS, read_text_files, text_file_samples

PROSE = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
CODE = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five\n"


@pytest.fixture(scope="module")
def model(tiny_model_dirs, tmp_path_factory):
    """The tiny Qwen3 checkpoint with a byte-level tokenizer (a token per byte) that starts
    every text with BOS (id 1)."""
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as token_models

    from triattention_jax.checkpoints.store import load_model

    folder = tmp_path_factory.mktemp("text_file") / "tiny-bytes"
    shutil.copytree(tiny_model_dirs["qwen3-tied"], folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(token_models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return load_model(str(folder), dtype="float32")


def _write(path: Path, content: str | bytes) -> str:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return str(path)


def test_fidelity_cuts_each_file_into_sequences_that_start_with_bos(model, tmp_path):
    prose, code = _write(tmp_path / "prose.txt", PROSE * 6), _write(tmp_path / "code.py", CODE * 5)
    samples = text_file_samples(model, read_text_files([prose, code]), "fidelity", 200)
    # 516 and 290 bytes: two sequences of BOS + 199 tokens from the first file, one from the second.
    assert [len(s) for s in samples] == [200, 200, 200] and all(s[0] == 1 for s in samples)
    assert model.tokenizer.decode(samples[0][1:] + samples[1][1:]) == (PROSE * 6)[:398]
    assert model.tokenizer.decode(samples[2][1:]) == (CODE * 5)[:199]
    prompts = text_file_samples(model, read_text_files([prose, code]), "divergence", 16)
    assert [len(p) for p in prompts] == [517, 291] and model.tokenizer.decode(prompts[1][1:]) == CODE * 5


def test_fidelity_and_divergence_runs_record_the_files(model, tmp_path):
    prose, code = _write(tmp_path / "prose.txt", PROSE * 6), _write(tmp_path / "code.py", CODE * 5)
    texts = read_text_files([prose, code])
    out = tmp_path / "fidelity"
    evaluate(model, task="fidelity", methods=["streaming"], budgets=[64], seq_len=200, out=out, texts=texts)
    cells = json.loads((out / "results.json").read_text())
    # Every sample the files give; budget 64 first compacts before position 192.
    assert sorted(cells) == [f"fidelity/streaming/64/{s}" for s in range(3)]
    assert all(cell["positions"] == 199 - 192 and cell["kl"] >= 0 for cell in cells.values())
    settings = json.loads((out / "settings.json").read_text())
    assert settings["text_files"] == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (prose, code)]
    assert settings["slack_trigger"] is False
    with pytest.raises(UserError, match="this run has text_files="):
        evaluate(model, task="fidelity", methods=["streaming"], budgets=[64], seq_len=200, out=out, texts=texts[::-1])
    with pytest.raises(UserError, match="slack_trigger=False, this run has slack_trigger=True"):
        evaluate(
            model,
            task="fidelity",
            methods=["streaming"],
            budgets=[64],
            seq_len=200,
            out=out,
            texts=texts,
            slack_trigger=True,
        )
    # The official phase: budget 100 after a 64-token prefill compacts first when the buffer
    # holds 228 tokens (the default phase: at the round boundary at 192).
    out = tmp_path / "fidelity_slack"
    options = dict(task="fidelity", methods=["streaming"], budgets=[100], seq_len=256, num_samples=1)
    evaluate(model, out=out, texts=texts, slack_trigger=True, **options)
    assert json.loads((out / "results.json").read_text())["fidelity/streaming/100/0"]["positions"] == 255 - 228
    assert json.loads((out / "settings.json").read_text())["slack_trigger"] is True
    out = tmp_path / "divergence"
    evaluate(model, task="divergence", methods=["streaming"], budgets=[64], seq_len=24, out=out, texts=texts)
    cells = json.loads((out / "results.json").read_text())
    assert sorted(cells) == ["divergence/streaming/64/0", "divergence/streaming/64/1"]
    assert all(cell["positions"] == 24 for cell in cells.values())


def test_a_folder_from_before_takes_only_the_settings_it_ran_with(tmp_path):
    """Folders written before slack_trigger and text_files were recorded hold results of the
    built-in texts in the default phase."""
    old = {"model": "m", "seq_len": 64}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    (tmp_path / "results.json").write_text(json.dumps({"fidelity/streaming/64/0": {"kl": 0.1}}))
    assert ResultStore(tmp_path, {**old, "slack_trigger": False, "text_files": []}).cells
    with pytest.raises(UserError, match="computed with slack_trigger=False, this run has slack_trigger=True"):
        ResultStore(tmp_path, {**old, "slack_trigger": True, "text_files": []})
    with pytest.raises(UserError, match=r"computed with text_files=\[\], this run has text_files=\['ab'\]"):
        ResultStore(tmp_path, {**old, "slack_trigger": False, "text_files": ["ab"]})


def test_unreadable_files_are_refused_in_one_line(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.txt")
    for path, message in [
        (missing, f"--text_file {missing} does not exist: give the path of a UTF-8 text file"),
        (str(tmp_path), f"--text_file {tmp_path} is a folder"),
        (_write(tmp_path / "latin1.txt", "café".encode("latin-1")), "is not UTF-8 text (at byte 3): save it as UTF-8"),
        (_write(tmp_path / "empty.txt", ""), "empty.txt is empty: give a file with text"),
        (_write(tmp_path / "blank.txt", " \n\t\n"), "blank.txt is empty"),
    ]:
        with pytest.raises(UserError) as error:
            read_text_files([_write(tmp_path / "fine.txt", PROSE), path])
        assert message in str(error.value) and "\n" not in str(error.value)
    locked = _write(tmp_path / "locked.txt", PROSE)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError, match=f"cannot read --text_file {locked} \\(Permission denied\\): make it readable"):
        read_text_files([locked])


def test_texts_that_give_no_sample_are_refused_before_any_work(model, tmp_path):
    short, prose = _write(tmp_path / "short.txt", PROSE), _write(tmp_path / "prose.txt", PROSE * 6)
    out = tmp_path / "out"

    def run(paths: list[str], **options) -> None:
        options = {"task": "fidelity", "methods": ["streaming"], "budgets": [64], "seq_len": 200, **options}
        evaluate(model, out=out, texts=read_text_files(paths), **options)

    cases = [
        ([short], {}, f"--text_file {short} has 87 tokens, too few for the 64-token prefill, one 128-token round"),
        ([prose], {"seq_len": 600}, f"--text_file {prose} has 517 tokens, fewer than --seq_len 600: lower --seq_len"),
        (
            [prose],
            {"seq_len": 100},
            f"--seq_len 100 is too short for --text_file samples: raise it to at least {MIN_TEXT_TOKENS} ",
        ),
        ([prose], {"num_samples": 3}, "give 2 fidelity samples, numbered from 0, and this run asks for samples 0 to 2"),
        ([prose], {"seed": 2}, "asks for samples 2 to 2: lower --seed"),
        ([prose], {"task": "needle"}, "--text_file serves --task fidelity and divergence, not needle: leave it out"),
        (
            [_write(tmp_path / "long.txt", PROSE * 24)],
            {"task": "divergence", "seq_len": 64},
            "has 2065 tokens, and with --seq_len 64 generated tokens it exceeds the model's context of 2048",
        ),
    ]
    for paths, options, message in cases:
        with pytest.raises(UserError, match=message):
            run(paths, **options)
        assert not out.exists()


def test_cli_refuses_a_missing_file_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "triattention_jax.cli.evaluate",
            "--text_file",
            str(tmp_path / "missing.txt"),
            "--slack_trigger",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert (
        lines[-1] == f"error: --text_file {tmp_path / 'missing.txt'} does not exist: give the path of a UTF-8 text file"
    )
    assert not (tmp_path / "out").exists()
