"""Tables and plots of a results folder: mean ± std per (method, budget), the paired
comparison of the first method with each other one, one PNG per metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from triattention_jax.eval.store import ResultStore
from triattention_jax.files import pyplot

TASK_METRICS = {
    "fidelity": ("kl", "top1_agreement", "delta_nll"),
    "divergence": ("tokens_to_divergence", "agreement"),
    "needle": ("answer_accuracy", "exact_match", "fact_kept"),
    "dfs": ("stack_exact", "current_exact", "visited_exact"),
    "code": ("exact_match", "edit_similarity"),
}
# Scored against a known answer rather than against full attention: full attention is a row.
GROUND_TRUTH_TASKS = ("needle", "dfs", "code")


# Each task's headline metric and whether lower is better, for the paired comparison.
PAIRED_METRIC = {
    "fidelity": ("kl", True),
    "divergence": ("tokens_to_divergence", False),
    "needle": ("answer_accuracy", False),
    "dfs": ("stack_exact", False),
    "code": ("edit_similarity", False),
}


def _cells_by_group(store: ResultStore, task: str) -> dict[tuple[str, int], dict[int, dict]]:
    grouped: dict[tuple[str, int], dict[int, dict]] = {}
    for key, cell in store.cells.items():
        cell_task, method, budget, sample = store.parse_key(key)
        if cell_task == task:
            grouped.setdefault((method, budget), {})[sample] = cell
    return dict(sorted(grouped.items()))


def summarize(store: ResultStore, task: str) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """(method, budget) -> metric -> (mean, std over samples, samples); NaN for a metric that
    none of the group's cells has (cells measured before the metric existed)."""

    def stats(values: list[float]) -> tuple[float, float, int]:
        return (float(np.mean(values)), float(np.std(values)), len(values)) if values else (np.nan, np.nan, 0)

    return {
        group: {m: stats([c[m] for c in cells.values() if m in c]) for m in TASK_METRICS[task]}
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


def _table_cell(mean: float, std: float, n: int, samples: int) -> str:
    """mean ± std, "(n)" after it where only n of the group's samples have the metric (cells
    from before it existed), "—" where none has."""
    if not n:
        return "—"
    return f"{mean:.4f} ± {std:.4f}" + (f" ({n})" if n != samples else "")


def write_outputs(store: ResultStore, task: str, folder: Path, reference: str | None = None) -> list[Path]:
    """A markdown table (and, given a reference method, its paired comparison with the others)
    and one PNG per metric (metric against budget, a line per method)."""
    plt = pyplot()

    summary = summarize(store, task)
    metrics = TASK_METRICS[task]
    lines = [
        f"| method | budget | {' | '.join(metrics)} | samples |",
        "| --- | ---: |" + " ---: |" * (len(metrics) + 1),
    ]
    for (method, budget), values in summary.items():
        samples = values[metrics[0]][2]
        cells = " | ".join(_table_cell(*values[m], samples) for m in metrics)
        lines.append(f"| {method} | {budget} | {cells} | {samples} |")
    paired = paired_comparison(store, task, reference) if reference else []
    if paired:
        metric = PAIRED_METRIC[task][0]
        lines += [
            "",
            f"Paired with {reference}, on the samples both have ({reference}'s mean / the method's mean):",
            "",
            f"| method | budget | {metric} | {reference}'s {metric} | ratio | {reference} better on |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
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
            ax.errorbar(
                [b for b, _ in points],
                [v[0] for _, v in points],
                yerr=[v[1] for _, v in points],
                label=method,
                marker="o",
                capsize=3,
            )
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
