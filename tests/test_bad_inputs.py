"""Hostile inputs: damaged files, malformed configs and statistics, unsafe sizes, reused result
folders, races and interrupts. Each ends in one `UserError` line (exit code 2 at the CLI, 130
for Ctrl-C) and leaves no file behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from triattention_jax import decoding
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.checkpoints.safetensors_io import read_safetensors, write_safetensors
from triattention_jax.checkpoints.stats import CalibrationResult, load_stats, save_stats
from triattention_jax.errors import UserError
from triattention_jax.eval.store import ResultStore
from triattention_jax.policies import StreamingLLM


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A top-level script, or a package module given as "-m name"."""
    command = script.split() if script.startswith("-m ") else [str(REPO_ROOT / script)]
    return subprocess.run(
        [sys.executable, *command, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def _one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ")
    return lines[-1]


def _one_line(error: UserError) -> str:
    message = str(error)
    assert "\n" not in message
    return message


# --- 1. evaluate never reports numbers computed under other settings --------------------------

SETTINGS = {
    "model": "m",
    "weights": "abc",
    "dtype": "float32",
    "seq_len": 4096,
    "divide_length": 128,
    "matmul_precision": "None",
}


@pytest.mark.parametrize("changed", [{"seq_len": 2048}, {"dtype": "bfloat16"}, {"model": "other"}, {"weights": "def"}])
def test_a_results_folder_refuses_other_settings(tmp_path, changed):
    ResultStore(tmp_path, SETTINGS).put("fidelity/streaming/128/0", {"kl": 0.1})
    name = next(iter(changed))
    with pytest.raises(UserError, match=f"computed with {name}="):
        ResultStore(tmp_path, {**SETTINGS, **changed})
    assert ResultStore(tmp_path, SETTINGS).cells == {"fidelity/streaming/128/0": {"kl": 0.1}}


def test_a_results_folder_without_recorded_settings_is_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"fidelity/streaming/128/0": {"kl": 0.1}}))
    with pytest.raises(UserError, match="without a record of their settings"):
        ResultStore(tmp_path, SETTINGS)


def test_evaluate_out_naming_a_file_is_refused_before_loading(tmp_path):
    out = tmp_path / "results"
    out.write_text("not a folder")
    assert "is a file, not a folder" in _one_error_line(
        _run("-m triattention_jax.cli.evaluate", "--out", str(out), "--model", "/no/such/model")
    )


# --- 2. damaged safetensors files ----------------------------------------------------------------


def _valid_file(path: Path) -> Path:
    write_safetensors(
        path, {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int32)}, metadata={"note": "x"}
    )
    return path


def _edited_header(path: Path, edit) -> bytes:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + length]))
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :]


@pytest.mark.parametrize("damage", ["half", "wrong_shape", "no_dtype", "list_header", "huge_length", "empty"])
def test_damaged_safetensors_named_in_one_line(tmp_path, damage):
    source = _valid_file(tmp_path / "ok.safetensors")
    raw = source.read_bytes()
    damaged = {
        "half": lambda: raw[: len(raw) // 2],
        "wrong_shape": lambda: _edited_header(source, lambda h: {**h, "a": {**h["a"], "shape": [4, 4]}}),
        "no_dtype": lambda: _edited_header(
            source, lambda h: {**h, "a": {k: v for k, v in h["a"].items() if k != "dtype"}}
        ),
        "list_header": lambda: _edited_header(source, lambda h: [1, 2]),
        "huge_length": lambda: struct.pack("<Q", 2**40) + raw[8:],
        "empty": lambda: b"",
    }[damage]()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damaged)
    with pytest.raises(UserError, match="cannot read safetensors file") as error:
        read_safetensors(path)
    _one_line(error.value)


def test_randomly_damaged_safetensors_and_statistics_end_in_user_error(tmp_path, tiny_model_dirs):
    """Property-style: truncations, flipped bytes and edited headers of a weights file and of a
    statistics file either still read (a flipped data byte is undetectable) or raise a one-line
    UserError; never another exception."""
    transformer = load_transformer(tiny_model_dirs["llama-tied"], dtype="float32")
    shape = (transformer.config.num_layers, transformer.config.num_heads, transformer.config.head_dim // 2)
    stats_file = tmp_path / "stats.safetensors"
    rng = np.random.default_rng(0)
    stats = {name: rng.normal(size=shape).astype(np.float32) for name in ("q_mean_real", "q_mean_imag", "q_abs_mean")}
    from triattention_jax.checkpoints.stats import model_metadata
    from triattention_jax.scoring import FrequencyStats

    save_stats(stats_file, CalibrationResult(stats=FrequencyStats(**stats), metadata=model_metadata(transformer)))
    weights_file = _valid_file(tmp_path / "weights.safetensors")
    readers = {weights_file: read_safetensors, stats_file: lambda p: load_stats(p, transformer)}
    outcomes = {"read": 0, "refused": 0}
    for source, reader in readers.items():
        raw = source.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        for trial in range(60):
            data = bytearray(raw)
            kind = trial % 3
            if kind == 0:
                data = data[: rng.integers(0, len(data))]
            elif kind == 1:
                for index in rng.integers(0, len(data), size=rng.integers(1, 4)):
                    data[index] ^= 1 << int(rng.integers(0, 8))
            else:
                start = int(rng.integers(8, 8 + length))
                data[start : start + 3] = bytes(rng.choice(list(b'{}[]":,0123456789-e'), size=3))
            path = tmp_path / f"damaged{source.suffix}"
            path.write_bytes(bytes(data))
            try:
                reader(path)
                outcomes["read"] += 1
            except UserError as error:
                _one_line(error)
                outcomes["refused"] += 1
    assert outcomes["refused"] > 60


# --- 3. --output_json checked before any work -----------------------------------------------------


@pytest.mark.parametrize("target, message", [("folder", "it is a folder"), ("/sys/a.json", "cannot write /sys/a.json")])
def test_unwritable_output_json_refused_up_front(tmp_path, target, message):
    path = str(tmp_path) if target == "folder" else target
    started = time.perf_counter()
    result = _run("decode.py", "--prompt", "x", "--model", "/no/such/model", "--output_json", path)
    assert message in _one_error_line(result)
    assert time.perf_counter() - started < 120
    assert not list(tmp_path.glob(".*.tmp"))


# --- 4. budgets and buffers beyond what the run can use ------------------------------------------


def test_budget_beyond_the_context_is_refused():
    result = _run("decode.py", "--prompt", "x", "--method", "streaming", "--budget", "100000", "--max_new_tokens", "2")
    assert "exceeds the model's context of 8192 tokens" in _one_error_line(result)


def test_budget_beyond_the_run_gets_a_buffer_of_the_runs_size(tiny_model_dirs):
    transformer = load_transformer(tiny_model_dirs["llama-tied"], dtype="float32")
    prompts = [[5, 6, 7]]
    full = decoding.generate(transformer, prompts, eos_ids=(), max_new_tokens=2, divide_length=16)
    capped = decoding.generate(
        transformer, prompts, eos_ids=(), max_new_tokens=2, divide_length=16, policy=StreamingLLM(budget=2000)
    )
    assert capped.kv_cache_bytes <= full.kv_cache_bytes
    assert capped.token_ids == full.token_ids


def test_a_buffer_larger_than_free_memory_is_refused(tiny_model_dirs, monkeypatch):
    transformer = load_transformer(tiny_model_dirs["llama-tied"], dtype="float32")
    monkeypatch.setattr(decoding, "free_device_memory", lambda: 1 << 16)
    with pytest.raises(UserError, match="the KV buffer needs .* GiB per device") as error:
        decoding.generate(transformer, [[5, 6, 7]] * 8, eos_ids=(), max_new_tokens=1000, divide_length=16)
    _one_line(error.value)


# --- 5. malformed config.json ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"}, "lacks num_attention_heads"),
        (lambda c: {**c, "max_position_embeddings": None}, "max_position_embeddings to null"),
        (lambda c: [c], "not a JSON object"),
        (lambda c: {**c, "num_key_value_heads": 0}, "num_key_value_heads to 0"),
        (lambda c: {**c, "rms_norm_eps": "tiny"}, "malformed value"),
    ],
)
def test_malformed_config_named_in_one_line(tmp_path, tiny_model_dirs, edit, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama-tied"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(UserError, match=message) as error:
        load_transformer(model)
    _one_line(error.value)


# --- 6. malformed statistics ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_transformer(tiny_model_dirs):
    return load_transformer(tiny_model_dirs["llama-tied"], dtype="float32")


def _stats_arrays(transformer):
    c = transformer.config
    return {
        name: np.ones((c.num_layers, c.num_heads, c.head_dim // 2), np.float32)
        for name in ("q_mean_real", "q_mean_imag", "q_abs_mean")
    }


@pytest.mark.parametrize("metadata, message", [("{not json", "not valid JSON"), ('"a string"', "not a JSON object")])
def test_statistics_with_bad_metadata(tmp_path, tiny_transformer, metadata, message):
    path = tmp_path / "stats.safetensors"
    write_safetensors(path, _stats_arrays(tiny_transformer), metadata={"triattention": metadata})
    with pytest.raises(UserError, match=message) as error:
        load_stats(path, tiny_transformer)
    _one_line(error.value)


def _reference_pt(path: Path, transformer, entries=None, metadata=None) -> Path:
    torch = pytest.importorskip("torch")
    c = transformer.config
    half = c.head_dim // 2
    if entries is None:
        entries = {
            f"layer{l:02d}_head{h:02d}": {n: torch.ones(half) for n in ("q_mean_real", "q_mean_imag", "q_abs_mean")}
            for l in range(c.num_layers)
            for h in range(c.num_heads)
        }
    torch.save(
        {
            "metadata": {"rope_style": "half", "head_dim": c.head_dim} if metadata is None else metadata,
            "stats": entries,
        },
        path,
    )
    return path


def test_reference_statistics_malformed(tmp_path, tiny_transformer):
    torch = pytest.importorskip("torch")
    half = tiny_transformer.config.head_dim // 2
    ones = {n: torch.ones(half) for n in ("q_mean_real", "q_mean_imag", "q_abs_mean")}
    cases = {
        "unknown key": ({"weird_name": ones}, None, "expected names like layer00_head00"),
        "wrong length": ({"layer00_head00": {**ones, "q_abs_mean": torch.ones(half + 3)}}, None, "has shape"),
        "metadata a string": (None, "metadata", "not a reference statistics file"),
    }
    for name, (entries, metadata, message) in cases.items():
        path = _reference_pt(tmp_path / f"{name.replace(' ', '_')}.pt", tiny_transformer, entries, metadata)
        with pytest.raises(UserError, match=message) as error:
            load_stats(path, tiny_transformer)
        _one_line(error.value)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_in_statistics_refused_in_one_line_without_unsafe_advice(tmp_path, tiny_transformer):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "exploit.pt"
    torch.save({"metadata": {}, "stats": _Exploit(marker)}, path)
    with pytest.raises(UserError) as error:
        load_stats(path, tiny_transformer)
    message = _one_line(error.value)
    assert "weights_only" not in message
    assert "objects other than tensors" in message
    assert not marker.exists()


# --- 7. two first-use conversions at once ---------------------------------------------------------


def test_concurrent_first_use_conversions_both_succeed(tmp_path):
    code = (
        "import sys; from triattention_jax.checkpoints import gguf; from pathlib import Path; "
        "gguf.ensure_packaged(gguf.DEFAULT_MODEL_NAME, Path(sys.argv[1]))"
    )
    target = tmp_path / "smollm2"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]
    assert read_safetensors(target / "model.safetensors")


# --- 10. Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_ends_in_one_line_and_exit_130():
    run = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "decode.py"),
            "--prompt",
            "Count to a thousand.",
            "--max_new_tokens",
            "4000",
            "--ignore_eos",
            "--compilation_cache",
            "off",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As in a terminal: a test run started in the background inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert run.stdout.read(1), "no text was generated"  # decoding is under way
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
