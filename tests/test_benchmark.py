"""The benchmark's tiny preset on the CPU: what it reports must add up (not how fast it is)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

from triattention_jax.bench.presets import PRESETS, random_transformer
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
    assert transformer.stacked("wq").shape == weight_specs(transformer.config)["wq"][0]


def test_tiny_preset_report_is_consistent(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "triattention_jax.cli.benchmark",
            "--preset",
            "tiny",
            "--methods",
            "full,triattention,h2o",
            "--budget",
            "64",
            "--new_tokens",
            "1536",
            "--batch",
            "2",
            "--dtype",
            "float32",
            "--prompt_tokens",
            "32",
            "--divide_length",
            "32",
            "--e2e_tokens",
            "256",
            "--nohf",
            "--profile",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    config = ModelConfig.from_hf(PRESETS["tiny"])
    runs = {row["method"]: row for row in report["runs"]}
    # full: one buffer of the 64-slot prompt bucket + 1536 generated, allocated once; the
    # eviction methods keep budget + divide_length slots.
    assert runs["full"]["kv_bytes_per_sequence"] == cache_nbytes(config, 1, 1600, jnp.float32)
    assert runs["triattention"]["kv_bytes_per_sequence"] == cache_nbytes(config, 1, 64 + 32, jnp.float32)
    # H2O also keeps one float32 attention sum per slot (2 layers x 2 KV heads x 96 slots).
    assert runs["h2o"]["kv_bytes_per_sequence"] == cache_nbytes(config, 1, 96, jnp.float32) + 4 * 2 * 2 * 96
    # The end-to-end run (256 tokens) allocated the buffers predicted.
    assert runs["full"]["e2e"]["kv_cache_bytes"] == cache_nbytes(config, 2, 64 + 256, jnp.float32)
    assert runs["triattention"]["e2e"]["kv_cache_bytes"] == 2 * runs["triattention"]["kv_bytes_per_sequence"]
    for row in runs.values():
        assert row["batch"] == 2 and row["new_tokens"] == 1536
        assert row["tokens_per_second"] == pytest.approx(2 * 1536 / row["integrated_seconds"], rel=1e-9)
        assert row["e2e"]["steady_rounds"] > 0
    steps = report["steps"]
    # Full attention is timed on its one buffer where its first, middle and last rounds start
    # (48 rounds of 32 steps after the 64-slot bucket); the others on their full buffer.
    full_steps = [s for s in steps if s["method"] == "full"]
    assert [s["filled"] for s in full_steps] == [64, 64 + 24 * 32, 64 + 47 * 32]
    assert {s["slots"] for s in full_steps} == {1600}
    assert {(s["slots"], s["filled"]) for s in steps if s["method"] != "full"} == {(96, 96)}
    weights = report["weight_bytes"]
    assert weights == sum(4 * int(np.prod(shape)) for shape, _ in weight_specs(config).values())
    roofline = report["roofline"]
    assert roofline["roofline_bytes_per_second"] == max(
        roofline["copy_bytes_per_second"], roofline["read_bytes_per_second"]
    )
    assert "CPU: small size" in roofline["size"]
    for step in steps:
        # What a step needs: the weights, and the slots in use, on average over its round
        # (eviction rounds compact to the budget of 64 first).
        in_use = (step["filled"] if step["method"] == "full" else 64) + 31 / 2
        assert step["bytes_per_step"] == pytest.approx(
            weights + cache_nbytes(config, 2, 1, jnp.float32) * in_use, abs=1
        )
        assert step["tokens_per_second"] == pytest.approx(2 / step["step_seconds"], rel=1e-9)
        assert step["roofline_fraction"] == pytest.approx(
            step["bytes_per_second"] / roofline["roofline_bytes_per_second"], rel=1e-9
        )
        assert (step["eviction_share"] is None) == (step["method"] == "full")
    # --profile: each method's first timed fill says where its round's time goes.
    first_steps = {s["method"]: s for s in reversed(steps)}
    sums = {method: sum(op["share"] for op in s["ops"]) for method, s in first_steps.items()}
    assert all(0 < total <= 1 for total in sums.values()), sums
    assert sum("ops" in s for s in steps) == len(first_steps)
    assert "tok/s" in result.stdout and "roofline" in result.stdout


def test_round_profile_counts_each_op_once():
    """Self times: the loop around the matrix products does not count them again, and XLA's
    ops account for most of a run that is nothing but those products."""
    import tempfile

    import jax

    from triattention_jax.bench.speed import RoundProfile

    @jax.jit
    def products(x):
        return jax.lax.fori_loop(0, 8, lambda _, y: jnp.tanh(y @ x), x)

    x = jnp.full((512, 512), 1e-3, jnp.float32)
    products(x).block_until_ready()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            products(x).block_until_ready()
            wall = time.perf_counter() - start
        profile = RoundProfile.from_trace(trace_dir, wall, devices=1)
    shares = [share for _, share in profile.ops]
    assert min(shares) > -1e-6 and 0.5 < sum(shares) <= 1
    assert profile.collective_share == 0
    assert profile.top(1)[0]["share"] == max(shares)


def test_round_profile_joins_a_hosts_threads(tmp_path):
    """XLA:CPU runs a loop's body on other pool threads than the loop, and independent ops
    side by side: a host's ops are one timeline, so no time counts twice."""
    import gzip

    from triattention_jax.bench.speed import RoundProfile

    def op(name, tid, start, duration):
        return {"ph": "X", "pid": 7, "tid": tid, "ts": start, "dur": duration, "name": name, "args": {"hlo_op": name}}

    def shares(events, wall_microseconds):
        folder = tmp_path / str(len(events)) / "plugins" / "profile" / "run"
        folder.mkdir(parents=True)
        with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
            json.dump({"traceEvents": events}, f)
        return dict(RoundProfile.from_trace(str(folder.parents[2]), wall_microseconds * 1e-6, devices=1).ops)

    loop = shares(
        [
            op("while.3", 1, 0, 100),
            op("dot_fusion.1", 2, 10, 30),
            op("dot_fusion.2", 3, 50, 40),
            op("copy.1", 4, 95, 15),  # overlaps the loop's end
        ],
        110,
    )
    assert loop == pytest.approx({"while": 25 / 110, "dot_fusion": 70 / 110, "copy": 15 / 110})
    assert sum(loop.values()) == pytest.approx(1.0)
    # Three ops side by side, the last overlapping both others: each instant counts once.
    side_by_side = shares([op("add.1", 1, 0, 10), op("exp.1", 2, 2, 2), op("copy.2", 3, 3, 9)], 12)
    assert side_by_side == pytest.approx({"add": 2 / 12, "exp": 1 / 12, "copy": 9 / 12})
    assert sum(side_by_side.values()) == pytest.approx(1.0)
