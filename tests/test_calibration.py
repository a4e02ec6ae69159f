"""Calibration statistics: what enters the means, the two file formats, model checks, the CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO_ROOT

from triattention_jax.calibration import accumulate
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.checkpoints.safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors
from triattention_jax.checkpoints.stats import CalibrationResult, load_stats, model_metadata, save_stats
from triattention_jax.errors import UserError


def _sequences(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in lengths]


def test_padding_never_enters_the_means(tiny_model_dirs):
    transformer = load_transformer(tiny_model_dirs["qwen2-untied"], dtype="float32")
    sequences = _sequences([50, 300, 7])
    batched = accumulate(transformer, sequences, batch_size=3, progress=False)
    separate = [accumulate(transformer, [s], batch_size=1, progress=False) for s in sequences]
    assert batched.count == 357
    np.testing.assert_allclose(batched.q_sum, sum(m.q_sum for m in separate), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(batched.q_abs_sum, sum(m.q_abs_sum for m in separate), rtol=1e-5)


@pytest.mark.parametrize("name, module", [("qwen3-tied", "q_norm"), ("qwen2-untied", "q_proj")])
def test_queries_are_taken_after_every_pre_rope_transform(tiny_model_dirs, name, module):
    """HF's own q after the bias (Qwen2) or q_norm (Qwen3), captured by a hook, gives the same means."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dirs[name], dtype=torch.float32).eval()
    captured = []
    for layer in hf.model.layers:
        getattr(layer.self_attn, module).register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    tokens = _sequences([120], seed=2)[0]
    with torch.no_grad():
        hf(torch.tensor([tokens]))
    config = hf.config
    q = (
        torch.stack(captured)
        .reshape(config.num_hidden_layers, len(tokens), config.num_attention_heads, config.head_dim)
        .numpy()
    )
    half = config.head_dim // 2
    expected = (q[..., :half] + 1j * q[..., half:]).mean(1)
    moments = accumulate(load_transformer(tiny_model_dirs[name], dtype="float32"), [tokens], progress=False)
    stats = moments.stats()
    np.testing.assert_allclose(stats.q_mean_real + 1j * stats.q_mean_imag, expected, atol=1e-5)
    np.testing.assert_allclose(stats.q_abs_mean, np.abs(q[..., :half] + 1j * q[..., half:]).mean(1), rtol=1e-5)
    spread = np.abs(q[..., :half] + 1j * q[..., half:] - expected[:, None]) ** 2
    np.testing.assert_allclose(moments.band_variance(), spread.mean(1), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def calibrated(tiny_model_dirs):
    transformer = load_transformer(tiny_model_dirs["llama3-untied"], dtype="float32")
    moments = accumulate(transformer, _sequences([200, 90]), progress=False)
    metadata = {**model_metadata(transformer), "num_tokens": moments.count, "source": "random tokens"}
    return transformer, CalibrationResult(stats=moments.stats(), metadata=metadata, q_band_var=moments.band_variance())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_statistics_round_trip(tmp_path, calibrated, suffix):
    transformer, result = calibrated
    path = tmp_path / f"stats{suffix}"
    save_stats(path, result)
    back = load_stats(path, transformer)
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
        np.testing.assert_array_equal(np.asarray(getattr(back.stats, name)), np.asarray(getattr(result.stats, name)))
    assert back.metadata["num_tokens"] == 290
    if suffix == ".pt":  # the reference format has no place for the band variance
        assert back.q_band_var is None
    else:
        np.testing.assert_array_equal(back.q_band_var, result.q_band_var)
    assert back.metadata["fingerprint"] == result.metadata["fingerprint"]
    assert not list(tmp_path.glob("*.tmp"))


def test_reference_pt_layout(tmp_path, calibrated):
    transformer, result = calibrated
    save_stats(tmp_path / "stats.pt", result)
    payload = torch.load(tmp_path / "stats.pt", weights_only=True)
    config = transformer.config
    assert payload["metadata"]["head_dim"] == config.head_dim
    assert len(payload["stats"]) == config.num_layers * config.num_heads
    entry = payload["stats"]["layer01_head02"]
    np.testing.assert_array_equal(entry["q_abs_mean"].numpy(), np.asarray(result.stats.q_abs_mean)[1, 2])
    assert entry["q_mean_real"].dtype == torch.float32 and entry["q_mean_real"].shape == (config.head_dim // 2,)


def test_statistics_of_another_model_are_refused(tmp_path, calibrated, tiny_model_dirs):
    _, result = calibrated
    save_stats(tmp_path / "stats.safetensors", result)
    other = load_transformer(tiny_model_dirs["llama-tied"], dtype="float32")
    with pytest.raises(UserError, match="were computed for another model"):
        load_stats(tmp_path / "stats.safetensors", other)
    # Same shapes, different weights: only the fingerprint tells them apart.
    same_shapes = load_transformer(tiny_model_dirs["llama3-untied"], dtype="bfloat16")
    assert model_metadata(same_shapes)["fingerprint"] == result.metadata["fingerprint"], "dtype must not matter"
    same_shapes.layers[1].wk[...] = same_shapes.layers[1].wk[...] * 1.5
    assert model_metadata(same_shapes)["fingerprint"] != result.metadata["fingerprint"], "the weights must count"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *args], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT
    )


@pytest.mark.slow
def test_calibrate_then_decode_with_triattention_on_the_real_model(tmp_path):
    source = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    stats = tmp_path / "stats.safetensors"
    report = tmp_path / "report"
    result = _run(
        "calibrate.py",
        "--calib_file",
        str(source),
        "--num_tokens",
        "1536",
        "--seq_len",
        "512",
        "--out",
        str(stats),
        "--report",
        "--report_dir",
        str(report),
        "--fit",
        "--fit_seq_len",
        "384",
        "--fit_horizon",
        "64",
        "--fit_budget",
        "32",
        # The choice compiles three programs of the real model (about 80 s on a cold cache, the
        # suite's margin); test_triattention_fit covers it on a small model.
        "--nofit_choose",
    )
    assert result.returncode == 0, result.stderr
    assert stats.exists()
    # The fit cuts the calibration file's 1,536 tokens into sequences of 384.
    assert "fitted scorer:" in result.stdout and "4 sequences" in result.stdout
    assert "chosen at budget" not in result.stdout
    numbers = json.loads((report / "report.json").read_text())
    assert numbers["num_tokens"] == 1536 and numbers["heads"] == 30 * 9
    assert 0 <= numbers["fraction_R_above_0.95"] <= numbers["fraction_R_above_0.90"] <= 1
    assert len(numbers["key_norm_vs_attention"]["spearman_per_kv_head"]) == 30
    assert -1 <= numbers["key_norm_vs_attention"]["spearman_median"] <= 1
    assert (report / "r_histogram.png").stat().st_size > 0 and (report / "reconstruction.png").stat().st_size > 0

    out = tmp_path / "out.json"
    result = _run(
        "decode.py",
        "--prompt",
        "Count from one to fifty in words.",
        "--method",
        "triattention",
        "--stats",
        str(stats),
        "--budget",
        "48",
        "--divide_length",
        "16",
        "--max_new_tokens",
        "96",
        "--ignore_eos",
        "--dtype",
        "float32",
        "--output_json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    decoded = json.loads(out.read_text())
    assert decoded["num_generated_tokens"] == [96]
    # 30 layers x 3 KV heads x (48 + 16) slots x (2 x 64 float32 values + an int32 position)
    assert decoded["kv_cache_bytes"] == 30 * 3 * 64 * (2 * 64 * 4 + 4)

    # What a choice of the fit records (its aggregation and redundancy weight) decodes, and the
    # report says so where the user named neither.
    fitted = stats.with_suffix(".fit.safetensors")
    metadata = read_safetensors_metadata(fitted)
    chosen = json.loads(metadata["triattention_fit"]) | {"aggregation": "per_layer", "redundancy_weight": 0.7}
    write_safetensors(fitted, read_safetensors(fitted), metadata=metadata | {"triattention_fit": json.dumps(chosen)})
    result = _run(
        "decode.py",
        "--prompt",
        "Count from one to fifty in words.",
        "--method",
        "triattention_fit",
        "--stats",
        str(stats),
        "--fitted_scorer",
        str(fitted),
        "--budget",
        "48",
        "--divide_length",
        "16",
        "--max_new_tokens",
        "96",
        "--ignore_eos",
        "--dtype",
        "float32",
        "--output_json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    decoded = json.loads(out.read_text())
    assert decoded["num_generated_tokens"] == [96]
    assert decoded["kv_cache_bytes"] == 30 * 3 * 64 * (2 * 64 * 4 + 4)
    assert decoded["policy_settings"]["redundancy_weight"] is None
    assert decoded["policy_settings"]["aggregation"] is None
    policy = decoded["policy"]
    assert policy["name"] == "TriAttentionFit" and policy["budget"] == 48
    assert policy["aggregation"] == "per_layer" and policy["redundancy_weight"] == 0.7


def test_decode_refuses_statistics_of_another_model(tmp_path, calibrated):
    _, result = calibrated
    save_stats(tmp_path / "tiny.safetensors", result)
    decoded = _run(
        "decode.py", "--prompt", "hi", "--method", "triattention", "--stats", str(tmp_path / "tiny.safetensors")
    )
    assert decoded.returncode == 2
    assert "were computed for another model" in decoded.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("direction, expected", [(-1.0, -1.0), (1.0, 1.0)])
def test_key_norm_attention_correlation(direction, expected):
    from triattention_jax.concentration import key_norm_attention

    # One query direction; key s points along it (direction +1) or against it (-1) with norm
    # 1 + s, so attention rises or falls with the norm and the first key has the smallest norm.
    length, num_queries = 12, 4
    queries = np.zeros((1, length, 2, 2))
    queries[..., 0] = 1.0
    keys = np.zeros((1, 1, length, 2))
    keys[0, 0, :, 0] = direction * (1.0 + np.arange(length))
    numbers = key_norm_attention(queries, keys, scale=0.5, num_queries=num_queries)
    assert numbers["spearman_per_kv_head"] == [[pytest.approx(expected)]]
    assert numbers["fraction_negative"] == (1.0 if expected < 0 else 0.0)
    assert numbers["share_of_keys_larger_than_sink_median"] == pytest.approx(1 - 1 / (length - num_queries))


def test_bundled_statistics_carry_their_band_variance():
    """expected_attention_calibrated needs it; every band's variance is at least the bound that
    Jensen's inequality sets from the same tokens' means, (E|q_f|)² − |E q_f|²."""
    from triattention_jax.calibration import BUNDLED_STATS_DIR
    from triattention_jax.checkpoints.safetensors_io import read_safetensors

    files = sorted(BUNDLED_STATS_DIR.glob("*.triattention_stats.safetensors"))
    assert len(files) == 3
    for path in files:
        tensors = {name: np.asarray(value) for name, value in read_safetensors(path).items()}
        assert tensors["q_band_var"].shape == tensors["q_mean_real"].shape, path.name
        bound = tensors["q_abs_mean"] ** 2 - tensors["q_mean_real"] ** 2 - tensors["q_mean_imag"] ** 2
        assert np.all(tensors["q_band_var"] >= bound - 1e-4 * np.abs(bound).max()), path.name
