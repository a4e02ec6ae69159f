"""The evaluation suite: metrics, the eviction schedule, and a resumable run on the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from triattention_jax.decoding import teacher_force
from triattention_jax.errors import UserError
from triattention_jax.eval.fidelity import first_eviction_position
from triattention_jax.eval.metrics import divergence_metrics, fidelity_metrics, position_metrics
from triattention_jax.eval.report import paired_comparison, write_outputs
from triattention_jax.eval.runner import evaluate
from triattention_jax.eval.store import ResultStore
from triattention_jax.eval.texts import PREFILL_TOKENS, fidelity_tokens
from triattention_jax.methods import parse_method
from triattention_jax.policies import FullAttention, StreamingLLM
from triattention_jax.prompts import token_fingerprint


def test_fidelity_metrics():
    full = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]))
    method = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [0.5, 0.25, 0.25]]))
    per_position = position_metrics(full[None], method[None], np.array([[0, 1, 2]]))[0]
    metrics = fidelity_metrics(np.asarray(per_position), start=1)
    expected_kl = np.sum(np.exp(full[1]) * (full[1] - method[1])) / 2
    assert metrics["kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert metrics["top1_agreement"] == 0.5
    assert metrics["delta_nll"] == pytest.approx((np.log(0.6) - np.log(0.3)) / 2, rel=1e-5)
    assert metrics["positions"] == 2


def test_divergence_metrics():
    assert divergence_metrics([1, 2, 3, 4], [1, 2, 9, 4]) == {
        "tokens_to_divergence": 2,
        "agreement": 0.75,
        "positions": 4,
    }


def test_first_eviction_follows_the_schedule():
    # Prefill of 64 tokens fills a 64-slot bucket; budget 256 + 128 slots: rounds start at
    # cursor 64, 192, 320 (full: 320 + 128 > 384), so the third round compacts first.
    assert first_eviction_position(StreamingLLM(budget=256), 64, 4096, 128) == 64 + 2 * 128
    assert first_eviction_position(StreamingLLM(budget=32), 64, 4096, 128) == 64
    assert first_eviction_position(FullAttention(), 64, 4096, 128) == 4096


@pytest.mark.slow
def test_fidelity_run_is_resumable(tmp_path):
    from triattention_jax.checkpoints.store import load_model

    model = load_model("smollm2-135m-instruct", dtype="float32")
    out = tmp_path / "fidelity"
    events = []
    paths = evaluate(
        model,
        task="fidelity",
        methods=["streaming"],
        budgets=[64, 256],
        num_samples=1,
        seq_len=384,
        out=out,
        progress=lambda *event: events.append(event),
    )
    assert events == [
        (0, 2, "fidelity/streaming/64 (1 samples)"),
        (1, 2, "fidelity/streaming/256 (1 samples)"),
        (2, 2, ""),
    ]
    cells = json.loads((out / "results.json").read_text())
    assert sorted(cells) == ["fidelity/streaming/256/0", "fidelity/streaming/64/0"]
    small, large = cells["fidelity/streaming/64/0"], cells["fidelity/streaming/256/0"]
    assert small["kl"] > 0 and large["kl"] > 0
    assert 0 <= small["top1_agreement"] <= 1
    # 384 tokens predict 383; the first compaction comes at position 192 (budget 64) and 320 (budget 256).
    assert small["positions"] == 383 - 192 and large["positions"] == 383 - 320
    # The stored KL is the one teacher forcing gives directly, from the text the cell records.
    tokens = fidelity_tokens(model, [0], 384)
    assert small["input"] == token_fingerprint(tokens[0])
    full = teacher_force(model, tokens, prefill_length=PREFILL_TOKENS)[0, 192:383]
    method = teacher_force(model, tokens, prefill_length=PREFILL_TOKENS, policy=StreamingLLM(budget=64))[0, 192:383]
    kl = np.sum(np.exp(full) * (full - method), axis=-1).mean()
    np.testing.assert_allclose(small["kl"], kl, rtol=1e-4)
    assert all(p.exists() for p in paths)
    assert "| streaming | 64 |" in (out / "fidelity.md").read_text()
    events.clear()
    evaluate(
        model,
        task="fidelity",
        methods=["streaming"],
        budgets=[64, 256],
        num_samples=1,
        seq_len=384,
        out=out,
        progress=lambda *event: events.append(event),
    )
    assert events == []
    # A folder whose cells were computed on another text (another Python's stdlib) is not extended.
    cells["fidelity/streaming/64/0"]["input"] = "0" * 16
    (out / "results.json").write_text(json.dumps(cells))
    with pytest.raises(UserError, match="sample 0 computed on another text"):
        evaluate(model, task="fidelity", methods=["streaming"], budgets=[128], num_samples=1, seq_len=384, out=out)


def test_method_variants_for_ablations():
    assert parse_method("streaming") == ("streaming", {})
    name, settings = parse_method("triattention:aggregation=per_layer;max_offset=4096;window=64;trig_term=false")
    assert name == "triattention"
    assert settings == {
        "aggregation": "per_layer",
        "offsets": tuple(2**i for i in range(13)),
        "window": 64,
        "trigonometric": False,
    }
    with pytest.raises(UserError, match="unknown method 'tri'"):
        parse_method("tri:window=4")
    with pytest.raises(UserError, match=r"options are aggregation=\.\.\., .*got 'span=4'"):
        parse_method("triattention:span=4")
    with pytest.raises(UserError, match="bad value for window: 'x'"):
        parse_method("triattention:window=x")


def test_paired_comparison_counts_samples_both_methods_have(tmp_path):
    store = ResultStore(tmp_path, {"model": "test"})
    kl = {
        ("triattention", 0): 0.1,
        ("triattention", 1): 0.3,
        ("triattention", 2): 0.2,
        ("streaming", 0): 0.2,
        ("streaming", 1): 0.25,
        ("h2o", 0): 0.4,
    }
    for (method, sample), value in kl.items():
        store.put(store.key("fidelity", method, 512, sample), {"kl": value, "top1_agreement": 0.9, "delta_nll": value})
    rows = paired_comparison(store, "fidelity", "triattention")
    assert rows == [
        ("h2o", 512, pytest.approx(0.4), pytest.approx(0.1), 1, 1),
        ("streaming", 512, pytest.approx(0.225), pytest.approx(0.2), 1, 2),
    ]
    table = write_outputs(store, "fidelity", tmp_path, "triattention")[0].read_text()
    assert "| streaming | 512 | 0.2250 | 0.2000 | 0.89 | 1/2 |" in table
    assert "| triattention | 512 | 0.2000 ± 0.0816 |" in table


def test_paired_comparison_follows_the_metric_direction(tmp_path):
    store = ResultStore(tmp_path, {"model": "test"})
    for method, tokens in (("triattention", 40), ("streaming", 25)):
        store.put(store.key("divergence", method, 256, 0), {"tokens_to_divergence": tokens, "agreement": 0.5})
    assert paired_comparison(store, "divergence", "triattention") == [("streaming", 256, 25.0, 40.0, 1, 1)]
