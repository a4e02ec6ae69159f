"""Quality of KV-cache methods against full attention, through the real decode path.

Tasks (each cell is one (task, method, budget, sample)):
- fidelity: teacher-forced sequences; mean KL(full ‖ method), top-1 agreement with full
  attention and ΔNLL, over the positions after the first eviction.
- divergence: free-running greedy generation; tokens until the first divergence from full
  attention, and the share of positions that agree.
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import sysconfig
from pathlib import Path
from typing import Any, Callable

import numpy as np

from triattention_jax.checkpoint import LoadedModel
from triattention_jax.errors import UserError
from triattention_jax.generate import DEFAULT_DIVIDE_LENGTH, generate, prompt_bucket, teacher_force
from triattention_jax.policies import EvictionPolicy, KVPolicy, PolicySettings, policy_class
from triattention_jax.prompts import encode_prompts

PREFILL_TOKENS = 64
REASONING_PROMPTS = (
    "Solve step by step: a shop sells pencils at 3 for 2 dollars. How much do 45 pencils cost?",
    "Explain, step by step, why the square root of 2 is irrational.",
    "A tank fills in 6 hours with pipe A and 9 hours with pipe B. How long with both? Show your reasoning.",
    "List the prime numbers below 60 and explain how you checked each one.",
)
SOURCES = ("python_source", "pydoc_prose", "self_generated")


def source_text(source: str, sample: int) -> str:
    """Long text for a fidelity sample: stdlib code, pydoc prose (self_generated is separate)."""
    if source == "python_source":
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.stat().st_size, reverse=True)
        return files[sample % len(files)].read_text(errors="replace")
    topics = sorted(pydoc_data.topics.topics)
    start = (sample * 7) % len(topics)
    return "\n\n".join(pydoc_data.topics.topics[t] for t in topics[start:] + topics[:start])


def fidelity_tokens(model: LoadedModel, sample: int, seq_len: int) -> np.ndarray:
    """seq_len tokens for one sample, the source chosen by sample index."""
    source = SOURCES[sample % len(SOURCES)]
    if source == "self_generated":
        prompt = encode_prompts(model.tokenizer, [REASONING_PROMPTS[sample // 3 % len(REASONING_PROMPTS)]], chat=bool(
            getattr(model.tokenizer, "chat_template", None)))[0]
        answer = generate(model.transformer, [prompt], max_new_tokens=seq_len - len(prompt)).token_ids[0]
        ids = prompt + answer
    else:
        ids = model.tokenizer(source_text(source, sample // len(SOURCES)))["input_ids"]
    if len(ids) < seq_len:
        raise UserError(f"sample {sample} ({source}) has only {len(ids)} tokens, fewer than --seq_len {seq_len}")
    return np.asarray(ids[:seq_len], np.int32)


def first_eviction_position(policy: KVPolicy, prefill_length: int, total: int, divide_length: int) -> int:
    """The position from which on the method may have evicted something (total if never)."""
    if not isinstance(policy, EvictionPolicy):
        return total
    bucket = prompt_bucket(prefill_length)
    if bucket > policy.budget:
        return prefill_length
    rounds = -(-(total - prefill_length) // divide_length)
    compacting = policy.compacting_rounds(bucket, rounds, divide_length)
    return prefill_length + compacting[0] * divide_length if compacting else total


def fidelity_metrics(full: np.ndarray, method: np.ndarray, targets: np.ndarray, start: int) -> dict[str, float]:
    """full, method: (T, V) log-probs predicting targets (T,); over positions >= start."""
    full, method, targets = full[start:], method[start:], targets[start:]
    kl = np.sum(np.exp(full) * (full - method), axis=-1)
    rows = np.arange(len(targets))
    return {
        "kl": float(kl.mean()),
        "top1_agreement": float((full.argmax(-1) == method.argmax(-1)).mean()),
        "delta_nll": float((full[rows, targets] - method[rows, targets]).mean()),
        "positions": int(len(targets)),
    }


def divergence_metrics(full: list[int], method: list[int]) -> dict[str, float]:
    agree = [a == b for a, b in zip(full, method)]
    first = agree.index(False) if False in agree else len(agree)
    return {"tokens_to_divergence": first, "agreement": float(np.mean(agree)), "positions": len(agree)}


class ResultStore:
    """results.json: one entry per finished cell, rewritten atomically after each, so a rerun
    skips what is done."""

    def __init__(self, folder: Path):
        self.path = folder / "results.json"
        self.cells: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    @staticmethod
    def key(task: str, method: str, budget: int, sample: int) -> str:
        return f"{task}/{method}/{budget}/{sample}"

    def put(self, key: str, cell: dict[str, Any]) -> None:
        self.cells[key] = cell
        tmp = self.path.with_name(".results.json.tmp")
        tmp.write_text(json.dumps(self.cells, indent=1))
        os.replace(tmp, self.path)


def build_policy(model: LoadedModel, method: str, budget: int) -> KVPolicy:
    """Every method with the same rule for the prefix: the teacher-forced text is one document,
    not a user prompt, so no method protects its first tokens (TriAttention would otherwise
    spend part of its budget on them while the baselines do not)."""
    return policy_class(method).from_settings(model, PolicySettings(budget=budget, protect_prompt=False))


def _pending(store: ResultStore, task: str, methods: list[str], budgets: list[int], sample: int) -> list[tuple[str, int]]:
    return [(m, b) for m in methods for b in budgets if store.key(task, m, b, sample) not in store.cells]


def run_fidelity(model: LoadedModel, store: ResultStore, methods: list[str], budgets: list[int], samples: range, seq_len: int,
                 progress: Callable[[str], None]) -> None:
    for sample in samples:
        pending = _pending(store, "fidelity", methods, budgets, sample)
        if not pending:
            continue
        tokens = fidelity_tokens(model, sample, seq_len)[None]
        reference = teacher_force(model.transformer, tokens, prefill_length=PREFILL_TOKENS)[0]
        for method, budget in pending:
            key = store.key("fidelity", method, budget, sample)
            progress(key)
            policy = build_policy(model, method, budget)
            start = first_eviction_position(policy, PREFILL_TOKENS, seq_len - 1, DEFAULT_DIVIDE_LENGTH)
            logprobs = teacher_force(model.transformer, tokens, prefill_length=PREFILL_TOKENS, policy=policy)[0]
            store.put(key, fidelity_metrics(reference[:-1], logprobs[:-1], tokens[0, 1:], start))


def run_divergence(model: LoadedModel, store: ResultStore, methods: list[str], budgets: list[int], samples: range,
                   seq_len: int, progress: Callable[[str], None]) -> None:
    chat = bool(getattr(model.tokenizer, "chat_template", None))
    for sample in samples:
        pending = _pending(store, "divergence", methods, budgets, sample)
        if not pending:
            continue
        prompt = encode_prompts(model.tokenizer, [REASONING_PROMPTS[sample % len(REASONING_PROMPTS)]], chat=chat)
        reference = generate(model.transformer, prompt, max_new_tokens=seq_len).token_ids[0]
        for method, budget in pending:
            key = store.key("divergence", method, budget, sample)
            progress(key)
            policy = build_policy(model, method, budget)
            store.put(key, divergence_metrics(reference, generate(model.transformer, prompt, max_new_tokens=seq_len, policy=policy).token_ids[0]))


TASKS = {"fidelity": run_fidelity, "divergence": run_divergence}
TASK_METRICS = {"fidelity": ("kl", "top1_agreement", "delta_nll"), "divergence": ("tokens_to_divergence", "agreement")}


def summarize(store: ResultStore, task: str) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """(method, budget) -> metric -> (mean, std over samples, samples)."""
    grouped: dict[tuple[str, int], list[dict]] = {}
    for key, cell in store.cells.items():
        cell_task, method, budget, _ = key.split("/")
        if cell_task == task:
            grouped.setdefault((method, int(budget)), []).append(cell)
    return {
        group: {m: (float(np.mean([c[m] for c in cells])), float(np.std([c[m] for c in cells])), len(cells))
                for m in TASK_METRICS[task]}
        for group, cells in sorted(grouped.items())
    }


def write_outputs(store: ResultStore, task: str, folder: Path) -> list[Path]:
    """A markdown table and one PNG per metric (metric against budget, a line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(store, task)
    metrics = TASK_METRICS[task]
    lines = [f"| method | budget | {' | '.join(metrics)} | samples |", "| --- | ---: |" + " ---: |" * (len(metrics) + 1)]
    for (method, budget), values in summary.items():
        cells = " | ".join(f"{values[m][0]:.4f} ± {values[m][1]:.4f}" for m in metrics)
        lines.append(f"| {method} | {budget} | {cells} | {values[metrics[0]][2]} |")
    table = folder / f"{task}.md"
    table.write_text("\n".join(lines) + "\n")
    paths = [table]
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method in sorted({m for m, _ in summary}):
            points = sorted((b, v[metric]) for (m, b), v in summary.items() if m == method)
            ax.errorbar([b for b, _ in points], [v[0] for _, v in points], yerr=[v[1] for _, v in points], label=method,
                        marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (KV entries per head)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric}")
        ax.legend()
        fig.tight_layout()
        path = folder / f"{task}_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def evaluate(model: LoadedModel, *, task: str, methods: list[str], budgets: list[int], num_samples: int, seq_len: int,
             out: Path, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Runs the cells not in out/results.json yet; writes the table and plots; returns the files.

    Samples are numbered from `seed`: sample i draws its text (or prompt) by index, so a seed
    picks another set of samples and results of different seeds accumulate side by side.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    for method in methods:
        policy_class(method)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out)
    TASKS[task](model, store, methods, budgets, range(seed, seed + num_samples), seq_len, progress or (lambda key: None))
    return [store.path, *write_outputs(store, task, out)]

