"""The needle and DFS tasks: their inputs, their scoring, and a run on the real model each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from triattention_jax.eval.fidelity import PREFILL_TOKENS
from triattention_jax.eval.runner import evaluate
from triattention_jax.eval.store import run_settings
from triattention_jax.eval.tasks.dfs import (
    MAX_STEPS,
    NUM_NODES,
    DfsState,
    dfs_metrics,
    dfs_problem,
    dfs_prompt,
    dfs_state,
    parse_dfs_answer,
    random_graph,
)
from triattention_jax.eval.tasks.needle import (
    FILLER_PER_BUDGET,
    NeedleStream,
    needle_key,
    needle_length,
    needle_metrics,
    needle_stream,
)
from triattention_jax.eval.texts import source_text, text_tokens

# 0 - 1 - 3, 0 - 2, 1 - 4: DFS goes 0, 1, 3, back to 1, 4, back to 1 and 0, then 2.
GRAPH = {0: (1, 2), 1: (0, 3, 4), 2: (0,), 3: (1,), 4: (1,)}


@pytest.fixture(scope="module")
def model():
    from triattention_jax.checkpoints.store import load_model

    return load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def tokenizer():
    from triattention_jax.checkpoints.store import resolve_model_dir
    from triattention_jax.checkpoints.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_dir("smollm2-135m-instruct"))


def test_needle_stream_layout(tokenizer):
    budget = 128
    length = needle_length(300, budget)
    assert length == FILLER_PER_BUDGET * budget + 128
    filler = text_tokens(tokenizer, source_text("pydoc_prose", 0), length, add_special_tokens=False)
    stream = needle_stream(tokenizer, "4817263", filler, length)
    assert len(stream.tokens) == length and stream.tokens.dtype == np.int32
    assert "The pass key is 4817263." in tokenizer.decode(stream.tokens[stream.fact[0] : stream.fact[1]])
    assert stream.fact[1] < 64  # stated within the prefill
    assert stream.question_start - stream.fact[1] >= FILLER_PER_BUDGET * budget
    assert (
        stream.tokens[stream.fact[1] : stream.question_start].tolist()
        == filler[: stream.question_start - stream.fact[1]]
    )
    # The scored span is the key's digits, the last tokens of the stream, after the question.
    assert tokenizer.decode(stream.tokens[stream.answer[0] : stream.answer[1]]) == "4817263"
    assert stream.answer[1] == length
    assert (
        tokenizer.decode(stream.tokens[stream.question_start : stream.answer[0]]).strip()
        == "What is the pass key? The pass key is"
    )
    assert needle_key(3) == needle_key(3) != needle_key(4) and len(needle_key(3)) == 7


def test_needle_metrics():
    stream = NeedleStream(np.array([5, 1, 2, 3, 4], np.int32), fact=(1, 2), question_start=2, answer=(2, 5))
    # Row t's greedy token predicts token t + 1: right on the key's first two tokens, wrong on the third.
    greedy = np.array([9, 2, 3, 0, 9])
    # Cached positions (layers, kv_heads, slots): the fact (position 1) is held by three of the
    # four token sets; -1 marks an empty slot.
    positions = np.array([[[0, 1, -1], [1, 3, 4]], [[0, 3, 4], [4, 1, 2]]])
    assert needle_metrics(greedy, stream, positions) == {
        "answer_accuracy": pytest.approx(2 / 3),
        "exact_match": 0.0,
        "fact_kept": 0.75,
        "length": 5,
    }
    greedy[3] = 4
    assert needle_metrics(greedy, stream, positions)["exact_match"] == 1.0


def test_dfs_state_by_hand():
    assert dfs_state(GRAPH, 0) == DfsState(0, (0,), frozenset({0}))
    assert dfs_state(GRAPH, 2) == DfsState(3, (0, 1, 3), frozenset({0, 1, 3}))
    assert dfs_state(GRAPH, 3) == DfsState(1, (0, 1), frozenset({0, 1, 3}))  # 3 is a dead end: back to 1
    assert dfs_state(GRAPH, 4) == DfsState(4, (0, 1, 4), frozenset({0, 1, 3, 4}))
    assert dfs_state(GRAPH, 6) == DfsState(0, (0,), frozenset({0, 1, 3, 4}))
    assert dfs_state(GRAPH, 7) == DfsState(2, (0, 2), frozenset(range(5)))
    with pytest.raises(ValueError):
        dfs_state(GRAPH, 9)


def test_dfs_problems_are_seeded_connected_graphs():
    graph = random_graph(np.random.default_rng(0))
    assert sorted(graph) == list(range(NUM_NODES))
    assert all(v in graph[n] for v, ns in graph.items() for n in ns)  # undirected
    assert all(list(ns) == sorted(set(ns)) and v not in ns for v, ns in graph.items())
    # Connected: the whole search visits every node.
    assert dfs_state(graph, 2 * (NUM_NODES - 1)).visited == frozenset(range(NUM_NODES))
    problem = dfs_problem(14)
    assert problem.steps == MAX_STEPS and dfs_problem(15).steps == 6
    assert problem == dfs_problem(14) and problem.adjacency != dfs_problem(13).adjacency
    assert problem.answer == dfs_state(problem.adjacency, MAX_STEPS)
    prompt = dfs_prompt(problem)
    assert f"exactly {MAX_STEPS} steps" in prompt and f"\n0: {', '.join(map(str, problem.adjacency[0]))}\n" in prompt


def test_dfs_answer_parser():
    answer = "Step 1: push 2\nStep 2: pop 2\nCurrent: 0\nStack: [0]\nVisited: {0, 2}\n"
    assert parse_dfs_answer(answer) == DfsState(0, (0,), frozenset({0, 2}))
    # The last statement of each field counts; case, spacing and a [] visited list are accepted.
    final = (
        "current node: 5\nSTACK: [0, 2]\nvisited = {0}\n...\nCurrent node = 7\nstack:[0,3 , 7]\nVisited set: [7, 0, 3]"
    )
    assert parse_dfs_answer(final) == DfsState(7, (0, 3, 7), frozenset({0, 3, 7}))
    assert parse_dfs_answer("Stack: []") == DfsState(None, (), None)
    assert parse_dfs_answer("Stack: [0, 2]\nVisited: {}").as_json() == {"current": None, "stack": [0, 2], "visited": []}
    assert parse_dfs_answer("I do not know.") == DfsState(None, None, None)
    assert parse_dfs_answer("Current: x\nStack: [0, a]\nVisited: {0, 1") == DfsState(None, None, None)
    assert parse_dfs_answer("Stack: 0, 1, 2\nVisited: {0,,1}") == DfsState(None, None, None)
    truth = DfsState(3, (0, 1, 3), frozenset({0, 1, 3}))
    assert dfs_metrics(truth, DfsState(3, (0, 1, 3), frozenset({3, 1, 0}))) == {
        "stack_exact": 1.0,
        "current_exact": 1.0,
        "visited_exact": 1.0,
    }
    assert dfs_metrics(truth, DfsState(3, (1, 0, 3), None)) == {
        "stack_exact": 0.0,
        "current_exact": 1.0,
        "visited_exact": 0.0,
    }


@pytest.mark.slow
def test_needle_run(model, tmp_path):
    out = tmp_path / "needle"
    out.mkdir()
    # A cell from an earlier run is kept, and its sample leaves the batch of that group.
    earlier = {"answer_accuracy": 0.5, "exact_match": 0.0, "length": 192}
    (out / "results.json").write_text(json.dumps({"needle/full/16/0": earlier}))
    (out / "settings.json").write_text(json.dumps(run_settings(model, 128)))
    events = []
    evaluate(
        model,
        task="needle",
        methods=["streaming"],
        budgets=[16],
        num_samples=2,
        seq_len=128,
        out=out,
        progress=lambda *event: events.append(event),
    )
    assert events == [(0, 3, "needle/full/16 (1 samples)"), (1, 3, "needle/streaming/16 (2 samples)"), (3, 3, "")]
    cells = json.loads((out / "results.json").read_text())
    assert cells["needle/full/16/0"] == earlier
    assert all(
        cells[f"needle/{m}/16/{s}"]["length"] == 4 * 16 + 128
        for m, s in [("full", 1), ("streaming", 0), ("streaming", 1)]
    )
    # Full attention recalls the key across four budgets of filler; StreamingLLM's 16 entries cannot.
    assert cells["needle/full/16/1"]["exact_match"] == 1.0
    assert all(cells[f"needle/streaming/16/{s}"]["exact_match"] == 0.0 for s in (0, 1))
    assert all(cells[f"needle/streaming/16/{s}"]["answer_accuracy"] < 0.5 for s in (0, 1))
    # Whether the fact was still cached when the answer was read: always under full attention.
    # StreamingLLM's prefill compaction keeps the 4 sinks and the prefill's last 12 tokens, and
    # the one round that follows evicts nothing: it holds the fact's tokens among those 12.
    assert cells["needle/full/16/1"]["fact_kept"] == 1.0
    for s in (0, 1):
        length = 4 * 16 + 128
        fact = needle_stream(
            model.tokenizer,
            needle_key(s),
            text_tokens(model.tokenizer, source_text("pydoc_prose", s), length, add_special_tokens=False),
            length,
        ).fact
        window = range(PREFILL_TOKENS - (16 - 4), PREFILL_TOKENS)
        held = len(set(range(*fact)) & set(window)) / (fact[1] - fact[0])
        assert cells[f"needle/streaming/16/{s}"]["fact_kept"] == pytest.approx(held)
    table = (out / "needle.md").read_text()
    # The earlier cell has no fact_kept: full's mean is sample 1's alone, marked (1).
    assert "| full | 16 | 0.7500 ± 0.2500 | 0.5000 ± 0.5000 | 1.0000 ± 0.0000 (1) | 2 |" in table
    assert "| streaming | 16 |" in table
    assert (out / "needle_exact_match.png").exists()


@pytest.mark.slow
def test_dfs_run(model, tmp_path):
    out = tmp_path / "dfs"
    paths = evaluate(
        model, task="dfs", methods=["streaming"], budgets=[64], num_samples=2, seq_len=48, out=out, seed=14
    )
    cells = json.loads((out / "results.json").read_text())
    assert sorted(cells) == ["dfs/full/64/14", "dfs/full/64/15", "dfs/streaming/64/14", "dfs/streaming/64/15"]
    assert [cells[f"dfs/full/64/{s}"]["steps"] for s in (14, 15)] == [MAX_STEPS, 6]
    for cell in cells.values():
        assert 0 < cell["answer_tokens"] <= 48
        assert {cell[m] for m in ("stack_exact", "current_exact", "visited_exact")} <= {0.0, 1.0}
        assert set(cell["answer"]) == {"current", "stack", "visited"}
    assert all(p.exists() for p in paths)
    assert "| full | 64 |" in (out / "dfs.md").read_text()
