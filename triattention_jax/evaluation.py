"""Quality of KV-cache methods against full attention, through the real decode path.

Tasks (each cell is one (task, method, budget, sample)):
- fidelity: teacher-forced sequences; mean KL(full ‖ method), top-1 agreement with full
  attention and ΔNLL, over the positions after the first eviction.
- divergence: free-running greedy generation; tokens until the first divergence from full
  attention, and the share of positions that agree.
- needle: a pass key near the start of a teacher-forced stream, at least four budgets of
  filler, then a question; greedy accuracy on the key's tokens and exact match.
- dfs: the paper's recursive state query; the greedy answer's DFS stack (also current node
  and visited set) after k steps on a random graph, exact match against the true state.

needle and dfs are scored against a known answer, so full attention is a row of their tables.
Each (method, budget) runs its pending samples as one batch.
"""

from __future__ import annotations

import hashlib
import json
import platform
import pydoc_data.topics
import sysconfig
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from triattention_jax.checkpoint import LoadedModel
from triattention_jax.errors import UserError
from triattention_jax.eval_tasks.dfs import dfs_metrics, dfs_problem, dfs_prompt, parse_dfs_answer
from triattention_jax.eval_tasks.needle import needle_key, needle_length, needle_metrics, needle_stream
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH
from triattention_jax.decoding import generate, prompt_bucket, teacher_force
from triattention_jax.policies import EvictionPolicy, FullAttention, KVPolicy, PolicySettings, policy_class
from triattention_jax.prompts import encode_prompts, has_chat_template, write_json_atomic
from triattention_jax.stats import model_fingerprint

PREFILL_TOKENS = 64
REASONING_PROMPTS = (
    "Solve step by step: a shop sells pencils at 3 for 2 dollars. How much do 45 pencils cost?",
    "Explain, step by step, why the square root of 2 is irrational.",
    "A tank fills in 6 hours with pipe A and 9 hours with pipe B. How long with both? Show your reasoning.",
    "List the prime numbers below 60 and explain how you checked each one.",
)
SOURCES = ("python_source", "pydoc_prose", "self_generated")


def source_text(source: str, sample: int) -> str:
    """Long text by index: a stdlib source file or all pydoc topics from a rotating start."""
    if source == "python_source":
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.stat().st_size, reverse=True)
        return files[sample % len(files)].read_text(errors="replace")
    topics = sorted(pydoc_data.topics.topics)
    start = (sample * 7) % len(topics)
    return "\n\n".join(pydoc_data.topics.topics[t] for t in topics[start:] + topics[:start])


def text_tokens(tokenizer: Any, text: str, count: int, **kwargs: Any) -> list[int]:
    """The first `count` tokens of text (all of them if fewer), tokenizing only a prefix:
    sources run to hundreds of kilobytes."""
    chars = 8 * count
    while True:
        ids = tokenizer(text[:chars], **kwargs)["input_ids"]
        # One token more than asked for, so the word cut at the prefix's end is not kept.
        if len(ids) > count or chars >= len(text):
            return list(ids[:count])
        chars *= 2


def fidelity_tokens(model: LoadedModel, samples: list[int], seq_len: int) -> np.ndarray:
    """(len(samples), seq_len) tokens, each sample's source chosen by its index; the
    self-generated ones come from one batched generation."""
    generated = [s for s in samples if SOURCES[s % len(SOURCES)] == "self_generated"]
    rows = {s: text_tokens(model.tokenizer, source_text(SOURCES[s % len(SOURCES)], s // len(SOURCES)), seq_len)
            for s in samples if s not in generated}
    if generated:
        prompts = encode_prompts(model.tokenizer, [REASONING_PROMPTS[s // 3 % len(REASONING_PROMPTS)] for s in generated],
                                 chat=has_chat_template(model.tokenizer))
        answers = generate(model.transformer, prompts, eos_ids=(), max_new_tokens=seq_len - min(map(len, prompts))).token_ids
        rows |= {s: (prompt + answer)[:seq_len] for s, prompt, answer in zip(generated, prompts, answers)}
    for sample in samples:
        if len(rows[sample]) < seq_len:
            raise UserError(f"sample {sample} ({SOURCES[sample % len(SOURCES)]}) has only {len(rows[sample])} tokens, "
                            f"fewer than --seq_len {seq_len}")
    return np.asarray([rows[s] for s in samples], np.int32)


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


def input_fingerprint(tokens: Any) -> str:
    """A short hash of a sample's token ids, stored with each cell whose input depends on the
    running Python (stdlib sources and pydoc prose change between versions)."""
    return hashlib.sha256(np.asarray(tokens, np.int32).tobytes()).hexdigest()[:16]


def divergence_metrics(full: list[int], method: list[int]) -> dict[str, float]:
    agree = [a == b for a, b in zip(full, method)]
    first = agree.index(False) if False in agree else len(agree)
    return {"tokens_to_divergence": first, "agreement": float(np.mean(agree)), "positions": len(agree)}


class ResultStore:
    """results.json: one entry per finished cell, rewritten atomically after each, so a rerun
    skips what is done. settings.json beside it records what every cell's numbers depend on
    besides its key (model, dtype, sequence length, ...); a run with other settings is refused
    rather than shown the old numbers."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        self.path = folder / "results.json"
        self.settings_path = folder / "settings.json"
        self.cells: dict[str, Any] = _read_json_object(self.path) if self.path.exists() else {}
        if self.cells:
            if not self.settings_path.exists():
                raise UserError(f"{folder} holds results without a record of their settings (model, dtype, --seq_len): "
                                "use a new --out")
            recorded = _read_json_object(self.settings_path)
            for name, value in settings.items():
                if recorded.get(name) != value:
                    raise UserError(f"{folder} holds results computed with {name}={recorded.get(name)!r}, this run has "
                                    f"{name}={value!r}: use a new --out, or the same settings to add cells")
        else:
            write_json_atomic(str(self.settings_path), settings)

    @staticmethod
    def key(task: str, method: str, budget: int, sample: int) -> str:
        return f"{task}/{method}/{budget}/{sample}"

    def put(self, key: str, cell: dict[str, Any]) -> None:
        self.cells[key] = cell
        write_json_atomic(str(self.path), self.cells)

    def check_input(self, task: str, sample: int, fingerprint: str, budget: int | None = None) -> None:
        """Refuses to mix, in one folder, cells of a sample computed on different inputs (at
        `budget` only, for inputs that depend on it)."""
        for key, cell in self.cells.items():
            cell_task, _, cell_budget, cell_sample = key.split("/")
            if (cell_task, int(cell_sample)) == (task, sample) and budget in (None, int(cell_budget)) \
                    and cell.get("input", fingerprint) != fingerprint:
                raise UserError(f"{self.path} holds {task} sample {sample} computed on another text (texts come from the "
                                f"running Python's standard library; this is Python {platform.python_version()}): "
                                f"use a new --out")


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): use a new --out") from e
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object: use a new --out")
    return value


def run_settings(model: LoadedModel, seq_len: int) -> dict[str, Any]:
    """Everything besides (task, method, budget, sample) that a cell's numbers depend on."""
    return {
        "model": model.name,
        "weights": model_fingerprint(model.transformer),
        "dtype": str(model.transformer.dtype),
        "seq_len": seq_len,
        "divide_length": DEFAULT_DIVIDE_LENGTH,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


def _boolean(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


# Options a method variant may set ("triattention:aggregation=per_layer;max_offset=4096"), for
# ablations: name -> (PolicySettings field, how the text becomes its value).
VARIANT_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "aggregation": ("aggregation", str),
    "window": ("window", int),
    "max_offset": ("offsets", lambda text: tuple(2**i for i in range(int(text).bit_length()))),
    "trig_term": ("trigonometric", _boolean),
    "norm_weighting": ("norm_weighting", _boolean),
    "protect_prompt": ("protect_prompt", _boolean),
}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """"name" or "name:option=value;option=value" (see VARIANT_OPTIONS) -> (name, PolicySettings fields).

    max_offset=N scores over the future offsets 1, 2, 4, ... up to N (the paper's offset range).
    """
    name, _, options = spec.partition(":")
    policy_class(name)
    settings: dict[str, Any] = {}
    for option in filter(None, options.split(";")):
        key, _, value = option.partition("=")
        if key not in VARIANT_OPTIONS or not value:
            raise UserError(f"method variant {spec!r}: options are {', '.join(f'{k}=...' for k in VARIANT_OPTIONS)}, "
                            f"separated by ';' (got {option!r})")
        field, convert = VARIANT_OPTIONS[key]
        try:
            settings[field] = convert(value)
        except (KeyError, ValueError) as e:
            raise UserError(f"method variant {spec!r}: bad value for {key}: {value!r}") from e
    return name, settings


def build_policy(model: LoadedModel, method: str, budget: int) -> KVPolicy:
    """Every method with the same rule for the prefix: the teacher-forced text is one document,
    not a user prompt, so no method protects its first tokens (TriAttention would otherwise
    spend part of its budget on them while the baselines do not); a variant may say otherwise."""
    name, settings = parse_method(method)
    return policy_class(name).from_settings(model, PolicySettings(**{"budget": budget, "protect_prompt": False, **settings}))


Group = tuple[str, int, list[int]]  # method, budget, samples not stored yet
Progress = Callable[[int, int, str], None]  # (cells done, cells to do, what runs now)


def _pending_groups(store: ResultStore, task: str, methods: list[str], budgets: list[int], samples: range) -> list[Group]:
    groups = [(m, b, [s for s in samples if store.key(task, m, b, s) not in store.cells]) for m in methods for b in budgets]
    return [g for g in groups if g[2]]


def _samples_in(groups: list[Group]) -> list[int]:
    return sorted({s for _, _, samples in groups for s in samples})


def _run_groups(store: ResultStore, task: str, groups: list[Group], run_group: Callable[[str, int, list[int]], list[dict]],
                progress: Progress) -> None:
    """run_group(method, budget, samples) computes a group's cells (one per sample, as one
    batch); each is stored as it comes, so an interrupted run resumes from the groups left."""
    total, done = sum(len(samples) for *_, samples in groups), 0
    for method, budget, samples in groups:
        progress(done, total, f"{task}/{method}/{budget} ({len(samples)} samples)")
        for sample, cell in zip(samples, run_group(method, budget, samples), strict=True):
            store.put(store.key(task, method, budget, sample), cell)
        done += len(samples)
    if groups:
        progress(total, total, "")


def run_fidelity(model: LoadedModel, store: ResultStore, methods: list[str], budgets: list[int], samples: range, seq_len: int,
                 progress: Progress) -> None:
    groups = _pending_groups(store, "fidelity", methods, budgets, samples)
    needed = _samples_in(groups)
    if not needed:
        return
    batch = fidelity_tokens(model, needed, seq_len)
    tokens = dict(zip(needed, batch))
    fingerprints = {s: input_fingerprint(tokens[s]) for s in needed}
    for sample, fingerprint in fingerprints.items():
        store.check_input("fidelity", sample, fingerprint)
    reference = dict(zip(needed, teacher_force(model.transformer, batch, prefill_length=PREFILL_TOKENS)))

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        policy = build_policy(model, method, budget)
        start = first_eviction_position(policy, PREFILL_TOKENS, seq_len - 1, DEFAULT_DIVIDE_LENGTH)
        logprobs = teacher_force(model.transformer, np.stack([tokens[s] for s in group]), prefill_length=PREFILL_TOKENS, policy=policy)
        return [fidelity_metrics(reference[s][:-1], row[:-1], tokens[s][1:], start) | {"input": fingerprints[s]}
                for s, row in zip(group, logprobs)]

    _run_groups(store, "fidelity", groups, run_group, progress)


def run_divergence(model: LoadedModel, store: ResultStore, methods: list[str], budgets: list[int], samples: range,
                   seq_len: int, progress: Progress) -> None:
    groups = _pending_groups(store, "divergence", methods, budgets, samples)
    needed = _samples_in(groups)
    if not needed:
        return
    texts = [REASONING_PROMPTS[s % len(REASONING_PROMPTS)] for s in needed]
    prompts = dict(zip(needed, encode_prompts(model.tokenizer, texts, chat=has_chat_template(model.tokenizer))))
    reference = dict(zip(needed, generate(model.transformer, list(prompts.values()), eos_ids=(), max_new_tokens=seq_len).token_ids))

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        policy = build_policy(model, method, budget)
        answers = generate(model.transformer, [prompts[s] for s in group], eos_ids=(), max_new_tokens=seq_len, policy=policy).token_ids
        return [divergence_metrics(reference[s], answer) for s, answer in zip(group, answers)]

    _run_groups(store, "divergence", groups, run_group, progress)


def run_needle(model: LoadedModel, store: ResultStore, methods: list[str], budgets: list[int], samples: range, seq_len: int,
               progress: Progress) -> None:
    context = model.config.max_position_embeddings
    for budget in budgets:
        if needle_length(seq_len, budget) > context:
            raise UserError(f"the needle at budget {budget} needs {needle_length(seq_len, budget)} tokens (its filler covers "
                            f"four budgets), more than the model's context of {context}: lower --budgets or --seq_len")

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        length = needle_length(seq_len, budget)
        streams = [needle_stream(model.tokenizer, needle_key(s), text_tokens(
            model.tokenizer, source_text("pydoc_prose", s), length, add_special_tokens=False), length) for s in group]
        fingerprints = [input_fingerprint(stream.tokens) for stream in streams]
        for sample, fingerprint in zip(group, fingerprints):
            store.check_input("needle", sample, fingerprint, budget)
        logprobs = teacher_force(model.transformer, np.stack([st.tokens for st in streams]), prefill_length=PREFILL_TOKENS,
                                 policy=build_policy(model, method, budget))
        return [needle_metrics(row, stream) | {"input": fingerprint}
                for row, stream, fingerprint in zip(logprobs, streams, fingerprints)]

    _run_groups(store, "needle", _pending_groups(store, "needle", methods, budgets, samples), run_group, progress)


def run_dfs(model: LoadedModel, store: ResultStore, methods: list[str], budgets: list[int], samples: range, seq_len: int,
            progress: Progress) -> None:
    groups = _pending_groups(store, "dfs", methods, budgets, samples)
    problems = {s: dfs_problem(s) for s in _samples_in(groups)}
    texts = [dfs_prompt(p) for p in problems.values()]
    prompts = dict(zip(problems, encode_prompts(model.tokenizer, texts, chat=has_chat_template(model.tokenizer))))
    full_answers: dict[int, list[int]] = {}

    def answers(policy: KVPolicy, group: list[int]) -> list[list[int]]:
        return generate(model.transformer, [prompts[s] for s in group], max_new_tokens=seq_len,
                        eos_ids=model.config.eos_token_ids, policy=policy).token_ids

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        if method == "full":  # the same answers at every budget: generated once
            missing = [s for s in group if s not in full_answers]
            if missing:
                full_answers.update(zip(missing, answers(FullAttention(), missing)))
            outputs = [full_answers[s] for s in group]
        else:
            outputs = answers(build_policy(model, method, budget), group)
        cells = []
        for sample, ids in zip(group, outputs):
            parsed = parse_dfs_answer(model.tokenizer.decode(ids, skip_special_tokens=True))
            cells.append({**dfs_metrics(problems[sample].answer, parsed), "steps": problems[sample].steps,
                          "answer_tokens": len(ids), "answer": parsed.as_json()})
        return cells

    _run_groups(store, "dfs", groups, run_group, progress)


TASKS = {"fidelity": run_fidelity, "divergence": run_divergence, "needle": run_needle, "dfs": run_dfs}
TASK_METRICS = {
    "fidelity": ("kl", "top1_agreement", "delta_nll"),
    "divergence": ("tokens_to_divergence", "agreement"),
    "needle": ("answer_accuracy", "exact_match"),
    "dfs": ("stack_exact", "current_exact", "visited_exact"),
}
# Scored against a known answer rather than against full attention: full attention is a row.
GROUND_TRUTH_TASKS = ("needle", "dfs")


# Each task's headline metric and whether lower is better, for the paired comparison.
PAIRED_METRIC = {"fidelity": ("kl", True), "divergence": ("tokens_to_divergence", False),
                 "needle": ("answer_accuracy", False), "dfs": ("stack_exact", False)}


def _cells_by_group(store: ResultStore, task: str) -> dict[tuple[str, int], dict[int, dict]]:
    grouped: dict[tuple[str, int], dict[int, dict]] = {}
    for key, cell in store.cells.items():
        cell_task, method, budget, sample = key.split("/")
        if cell_task == task:
            grouped.setdefault((method, int(budget)), {})[int(sample)] = cell
    return dict(sorted(grouped.items()))


def summarize(store: ResultStore, task: str) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """(method, budget) -> metric -> (mean, std over samples, samples)."""
    return {
        group: {m: (float(np.mean([c[m] for c in cells.values()])), float(np.std([c[m] for c in cells.values()])),
                    len(cells))
                for m in TASK_METRICS[task]}
        for group, cells in _cells_by_group(store, task).items()
    }


def paired_comparison(store: ResultStore, task: str, reference: str) -> list[tuple[str, int, float, float, int, int]]:
    """Every other method against `reference` on the samples both have, per budget, on the
    task's headline metric: (method, budget, method's mean, reference's mean, samples on which
    the reference is better, shared samples). Spreads over samples mostly measure how hard
    each text is; the paired count shows whether one method is better text by text."""
    metric, lower_is_better = PAIRED_METRIC[task]
    grouped = _cells_by_group(store, task)
    rows = []
    for (method, budget), cells in grouped.items():
        base = grouped.get((reference, budget), {})
        shared = sorted(set(cells) & set(base))
        if method == reference or not shared:
            continue
        other = np.array([cells[s][metric] for s in shared])
        chosen = np.array([base[s][metric] for s in shared])
        better = int(np.sum(chosen < other if lower_is_better else chosen > other))
        rows.append((method, budget, float(other.mean()), float(chosen.mean()), better, len(shared)))
    return rows


def write_outputs(store: ResultStore, task: str, folder: Path, reference: str | None = None) -> list[Path]:
    """A markdown table (and, given a reference method, its paired comparison with the others)
    and one PNG per metric (metric against budget, a line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(store, task)
    metrics = TASK_METRICS[task]
    lines = [f"| method | budget | {' | '.join(metrics)} | samples |", "| --- | ---: |" + " ---: |" * (len(metrics) + 1)]
    for (method, budget), values in summary.items():
        cells = " | ".join(f"{values[m][0]:.4f} ± {values[m][1]:.4f}" for m in metrics)
        lines.append(f"| {method} | {budget} | {cells} | {values[metrics[0]][2]} |")
    paired = paired_comparison(store, task, reference) if reference else []
    if paired:
        metric = PAIRED_METRIC[task][0]
        lines += ["", f"Paired with {reference}, on the samples both have ({reference}'s mean / the method's mean):", "",
                  f"| method | budget | {metric} | {reference}'s {metric} | ratio | {reference} better on |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for method, budget, other, chosen, better, shared in paired:
            ratio = f"{chosen / other:.2f}" if other else "—"
            lines.append(f"| {method} | {budget} | {other:.4f} | {chosen:.4f} | {ratio} | {better}/{shared} |")
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


def check_output_folder(out: Path) -> None:
    """Refuses, before any work, an --out that is a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give a folder name")


def evaluate(model: LoadedModel, *, task: str, methods: list[str], budgets: list[int], num_samples: int, seq_len: int,
             out: Path, seed: int = 0, progress: Progress | None = None) -> list[Path]:
    """Runs the cells not in out/results.json yet; writes the table and plots; returns the files.

    Samples are numbered from `seed`: sample i draws its text (or prompt, key, graph) by index,
    so a seed picks another set of samples and results of different seeds accumulate side by
    side. seq_len: tokens per sequence (fidelity; the needle's least length) or generated
    tokens (divergence; dfs at most). `progress(done, total, running)` is called before each
    group of cells and once at the end. The table compares the first method with each other
    one, sample by sample.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    for method in methods:
        parse_method(method)
    if not methods:
        raise UserError("no methods given: pass --methods, e.g. triattention,streaming")
    reference = methods[0]
    if task in GROUND_TRUTH_TASKS and "full" not in methods:
        methods = ["full", *methods]
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out, run_settings(model, seq_len))
    TASKS[task](model, store, methods, budgets, range(seed, seed + num_samples), seq_len,
                progress or (lambda done, total, running: None))
    return [store.path, *write_outputs(store, task, out, reference)]

