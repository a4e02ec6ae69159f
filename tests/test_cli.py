"""decode.py end to end: the report it writes, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def _decode(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "decode.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no error message"
    return lines[-1]


def test_default_model_writes_the_report(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nName a primary color.\n")
    out = tmp_path / "out.json"
    result = _decode(
        "--prompt_file", str(prompts), "--max_new_tokens", "24", "--dtype", "float32", "--output_json", str(out)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    for key in (
        "prompts",
        "generated_token_ids",
        "texts",
        "num_prompt_tokens",
        "num_generated_tokens",
        "kv_cache_bytes",
        "wall_seconds",
        "tokens_per_second",
    ):
        assert key in report
    assert report["prompts"] == ["What is the capital of France?", "Name a primary color."]
    assert "Paris" in report["texts"][0]
    assert report["num_generated_tokens"] == [len(ids) for ids in report["generated_token_ids"]]
    assert all(0 < n <= 24 for n in report["num_generated_tokens"])
    # 30 layers x 2 rows x 3 KV heads x (64-token prompt bucket + one 128-step round) slots
    # x (2 x 64 float32 + position)
    assert report["kv_cache_bytes"] == 30 * 2 * 3 * 192 * (2 * 64 * 4 + 4)
    assert "Paris" in result.stdout


def test_ignore_eos_generates_exactly_max_new_tokens(tmp_path):
    out = tmp_path / "out.json"
    result = _decode(
        "--prompt", "Hi", "--max_new_tokens", "40", "--ignore_eos", "--divide_length", "16", "--output_json", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["num_generated_tokens"] == [40]


@pytest.fixture()
def unreadable_checkpoint(tmp_path, tiny_model_dirs):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama-tied"], broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return broken


def _long_prompt_file(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("word " * 9000 + "\n")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--dtype", "float64"], "value should be one of"),
        (["--prompt", "x", "--method", "magic"], "value should be one of"),
        (["--prompt", "x", "--model", "/no/such/model"], "model '/no/such/model' not found"),
        (["--prompt", "x", "--model", "no-such-local-name"], "not found"),
        (["--prompt_file", "/no/such/prompts.txt"], "cannot read --prompt_file /no/such/prompts.txt"),
        (["--prompt", "x", "--prompt_file", "p.txt"], "give exactly one of --prompt or --prompt_file"),
        ([], "give exactly one of --prompt or --prompt_file"),
        (["--prompt", "x", "--max_new_tokens", "0"], "max_new_tokens must be at least 1"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "x", "--top_p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "x", "--output_json", "/no/such/dir/out.json"], "folder /no/such/dir does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line(args, message):
    assert message in _error_line(_decode(*args))


def test_unreadable_checkpoint(unreadable_checkpoint, tmp_path):
    out = tmp_path / "out.json"
    result = _decode("--prompt", "x", "--model", str(unreadable_checkpoint), "--output_json", str(out))
    assert "cannot read safetensors file" in _error_line(result)
    assert not out.exists()


def test_unsupported_architecture(tmp_path, tiny_model_dirs):
    model = tmp_path / "mistral"
    shutil.copytree(tiny_model_dirs["llama-tied"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert "unsupported model_type 'mistral'" in _error_line(_decode("--prompt", "x", "--model", str(model)))


def test_prompt_longer_than_context(tmp_path):
    out = tmp_path / "out.json"
    result = _decode("--prompt_file", str(_long_prompt_file(tmp_path)), "--output_json", str(out))
    assert "exceeds the model's context of 8192 tokens" in _error_line(result)
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def _imported_modules(result: subprocess.CompletedProcess) -> set[str]:
    """Module names from `python -X importtime`'s report on stderr."""
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_help_exits_zero_before_importing_jax():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO_ROOT / "decode.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0
    assert "--max_new_tokens" in result.stdout
    assert "jax" not in _imported_modules(result)


def test_decoding_imports_no_torch_and_prints_no_torch_advice():
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(REPO_ROOT / "decode.py"),
            "--prompt",
            "What is the capital of France?",
            "--max_new_tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
    assert not {m for m in _imported_modules(result) if m == "torch" or m.startswith("torch.")}
    assert "PyTorch was not found" not in result.stderr


def test_a_budget_beyond_the_run_says_nothing_is_evicted():
    result = _decode("--prompt", "Hi", "--method", "streaming", "--budget", "512", "--max_new_tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "nothing will be evicted" in result.stderr


def test_method_flag_lists_every_registered_policy():
    from triattention_jax.cli.run import METHOD_NAMES
    from triattention_jax.policies import policy_names

    assert sorted(METHOD_NAMES) == sorted(policy_names())
