"""The benchmark's tiny preset on the CPU: what it reports must add up (not how fast it is)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import pytest

from conftest import REPO_ROOT
from triattention_jax.benchmark import PRESETS, random_transformer
from triattention_jax.cache import cache_nbytes
from triattention_jax.config import ModelConfig
from triattention_jax.model import weight_specs


def test_presets_build_real_shapes():
    for name, hf in PRESETS.items():
        config = ModelConfig.from_hf(hf)
        assert config.num_heads % config.num_kv_heads == 0, name
    qwen3 = ModelConfig.from_hf(PRESETS["qwen3-8b"])
    kv_bytes_per_token = 2 * qwen3.num_layers * qwen3.num_kv_heads * qwen3.head_dim * 2
    assert kv_bytes_per_token == 144 * 1024  # SPEC 9: 144 KiB of bf16 KV per token
    weights = sum(int(jnp.prod(jnp.array(shape))) for shape, _ in weight_specs(qwen3).values())
    assert abs(2 * weights / 1e9 - 16.4) < 0.1  # 16.4 GB of bf16 weights
    transformer = random_transformer("tiny", "float32")
    assert transformer.wq[...].shape == weight_specs(transformer.config)["wq"][0]


def test_tiny_preset_report_is_consistent(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "triattention_jax.benchmark", "--preset", "tiny", "--methods", "full,triattention,h2o",
         "--budget", "64", "--new_tokens", "256", "--batch", "2", "--dtype", "float32", "--prompt_tokens", "32",
         "--divide_length", "32", "--nohf", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["results"]}
    config = ModelConfig.from_hf(PRESETS["tiny"])
    # full: its buffer grows to the 64-slot prompt bucket + 256 generated.
    assert rows["full"]["kv_cache_bytes"] == cache_nbytes(config, 2, 64 + 256, jnp.float32)
    assert rows["triattention"]["kv_cache_bytes"] == cache_nbytes(config, 2, 64 + 32, jnp.float32)
    # H2O also keeps one float32 attention sum per slot.
    assert rows["h2o"]["kv_cache_bytes"] == cache_nbytes(config, 2, 64 + 32, jnp.float32) + 4 * 2 * 2 * 2 * 96
    for row in rows.values():
        assert row["batch"] == 2 and row["new_tokens"] == 256
        assert row["tokens_per_second"] == pytest.approx(2 * 256 / row["seconds"], rel=1e-9)
    assert rows["full"]["eviction_share"] is None
    assert 0 < rows["triattention"]["eviction_share"] < 1
    assert "triattention" in result.stdout and "tok/s" in result.stdout

