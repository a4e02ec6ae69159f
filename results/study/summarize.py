"""Tables and plots across the study's models: python results/study/summarize.py results/study

Reads <folder>/<model>/{fidelity,needle,code}*/results.json (written by `evaluate`, see
run_study.sh) and writes <folder>/SUMMARY.md and <folder>/fidelity_kl.png: KL against full
attention per method and budget (mean, std over the texts), the issue's targets at budget 512
with paired wins (also for the oracles of oracle.py, which bound what a ranking by future
attention can give), pass-key and code-completion accuracy with full attention as a row.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

MODELS = {
    "smol": "SmolLM2-135M-Instruct",
    "q05": "Qwen2.5-Coder-0.5B-Instruct",
    "q15": "Qwen2.5-Coder-1.5B-Instruct",
    # Session 8's CPU run (Python 3.11's texts, 6 of them), where the oracles and the second fit ran.
    "smol_cpu": "SmolLM2-135M-Instruct, 2-core CPU, Python 3.11 texts",
    # Session 27's CPU runs: each model's fit and the two rivals of its targets on six more texts.
    "smol_cpu_more": "SmolLM2-135M-Instruct, 2-core CPU, Python 3.11 texts, samples 9-15",
    "q05_cpu": "Qwen2.5-Coder-0.5B-Instruct, 2-core CPU, Python 3.11 texts",
    "q15_cpu": "Qwen2.5-Coder-1.5B-Instruct, 2-core CPU, Python 3.11 texts",
}
# A model's texts run on another machine, pooled with its own for the targets at 512. A sample
# index names one document on both (Python 3.11 and 3.12 rank their largest standard-library
# files alike), so each index counts once, with the model's own cell where both ran it.
POOLED = {"smol": "smol_cpu_more", "q05": "q05_cpu", "q15": "q15_cpu"}
# The fit in its current form (session 22: output target, started from the prior; session 25:
# its mix with R-KV's redundancy chosen, device.sh choose), the same weights without the mix
# (session 23), and the first form's two fits (sessions 8-20: the attention paid, sinks and
# value norm inside the softmax), kept as history rows.
FIT = "triattention_fit"
FIT_UNMIXED = "triattention_fit, no redundancy mix"
FIT_REST, FIT_NEXT = "triattention_fit, first form (every later query)", "triattention_fit, first form (next 512)"
FIRST_FORM_FILES = {"rest.fit": FIT_REST, "horizon0.fit": FIT_REST, "horizon512.fit": FIT_NEXT, "next512.fit": FIT_NEXT}
# Bounds that read the future (oracle.py), not methods: in the tables, never in the rankings.
ORACLES = ["oracle_per_head", "oracle_per_layer_per_head"]
ORDER = [FIT, FIT_UNMIXED, FIT_NEXT, FIT_REST, "triattention", "expected_attention", "h2o", "snapkv", "rkv", "streaming", "random", *ORACLES]


def label(method: str) -> str:
    if not method.startswith(FIT):
        return method
    first_form = next((name for file, name in FIRST_FORM_FILES.items() if file in method), None)
    if first_form:
        return first_form
    # Any other fit file than the current default's is a variant with a row of its own.
    stem = Path(method.partition("fitted_scorer=")[2]).name.removesuffix(".fit.safetensors")
    # "" is the model folder's fit: SmolLM2's session-22 cells at 512, output_prior's weights.
    return {"chosen": FIT, "output_prior": FIT_UNMIXED, "": FIT_UNMIXED}.get(stem, f"{FIT} ({stem})")


def cells(folder: Path, task: str) -> dict[tuple[str, int], dict[int, dict]]:
    """The task's cells from every <folder>/<task>*/results.json (a study may run its methods
    in several folders side by side)."""
    out: dict[tuple[str, int], dict[int, dict]] = defaultdict(dict)
    for path in sorted(folder.glob(f"{task}*/results.json")):
        for key, cell in json.loads(path.read_text()).items():
            _, rest = key.split("/", 1)
            method, budget, sample = rest.rsplit("/", 2)
            out[(label(method), int(budget))][int(sample)] = cell
    return out


def one_sample_per_file(table: dict) -> dict:
    """Code cells with each source file counted once, at its lowest sample index: folders run on
    machines with different Pythons rank the standard library's files differently, so one file
    can come back under another index (session 26: the CPU's sample 16 is the device's 14,
    mailbox.py)."""
    first: dict[str, int] = {}
    for per_sample in table.values():
        for sample, cell in per_sample.items():
            first[cell["file"]] = min(first.get(cell["file"], sample), sample)
    return {
        key: {s: c for s, c in per_sample.items() if first[c["file"]] == s} for key, per_sample in table.items()
    }


def methods_in(table: dict) -> list[str]:
    present = {m for m, _ in table}
    return [m for m in ["full", *ORDER] if m in present]


def metric_table(table: dict, metric: str, digits: int) -> list[str]:
    """Mean ± std per method and budget; "(n)" marks a cell with fewer samples than the most."""
    budgets = sorted({b for _, b in table})
    most = max(len(v) for v in table.values())
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "| --- |" + " ---: |" * len(budgets)]
    for m in methods_in(table):
        row = []
        for b in budgets:
            values = [c[metric] for c in table.get((m, b), {}).values()]
            count = f" ({len(values)})" if len(values) < most else ""
            row.append(f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}{count}" if values else "—")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines


def paired_values(table: dict, a: str, b: str, budget: int, metric: str = "kl") -> dict[int, tuple[float, float]]:
    """Per text both methods ran: (a's value, b's value)."""
    x, y = table.get((a, budget), {}), table.get((b, budget), {})
    return {s: (x[s][metric], y[s][metric]) for s in sorted(x.keys() & y.keys())}


def paired(table: dict, a: str, b: str, budget: int, metric: str = "kl") -> tuple[float, float, int, int]:
    """(mean of a, mean of b, texts where a is lower, texts both have)."""
    pairs = paired_values(table, a, b, budget, metric)
    if not pairs:
        return float("nan"), float("nan"), 0, 0
    xa, ya = np.array(list(pairs.values())).T
    return float(xa.mean()), float(ya.mean()), int((xa < ya).sum()), len(pairs)


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, bound: float, draws: int = 10_000) -> tuple[float, float, float]:
    """The ratio of means a / b over texts resampled with replacement: its 2.5th and 97.5th
    percentiles and the share of resamples at or below `bound`."""
    picks = np.random.default_rng(0).integers(0, len(a), (draws, len(a)))
    ratios = a[picks].mean(axis=1) / b[picks].mean(axis=1)
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5)), float(np.mean(ratios <= bound))


def pooled_targets(own: dict, other: dict, other_name: str) -> list[str]:
    """The fit's targets at 512 over the samples of both tables, each sample once, `own`'s cell first."""
    lines = [f"Targets at budget 512 pooled with {other_name}'s texts (each sample index once; "
             "bootstrap over the texts):", ""]
    for rival, bound in (("streaming", 0.5), ("triattention", 0.85)):
        pairs = {**paired_values(other, FIT, rival, 512), **paired_values(own, FIT, rival, 512)}
        if not pairs:
            continue
        a, b = np.array(list(pairs.values())).T
        low, high, share = bootstrap_ratio(a, b, bound)
        verdict = "met" if a.mean() <= bound * b.mean() else "missed"
        lines.append(f"- {FIT} / {rival}: {a.mean():.4f} / {b.mean():.4f} = {a.mean() / b.mean():.2f}x over "
                     f"{len(a)} texts (target <= {bound}x: {verdict}); lower on {int((a < b).sum())}/{len(a)}; "
                     f"95% of resamples {low:.2f}x-{high:.2f}x, at or below {bound}x in {share:.0%}; "
                     f"median per text {np.median(a / b):.2f}x")
    return lines + [""]


def code_target(table: dict) -> list[str]:
    """The issue's code target at budget 512: edit similarity within 2 points of full
    attention's, as paired differences over the same files (mean ± standard error)."""
    lines = ["Code target at budget 512 (edit similarity within 2 points of full attention's; "
             "paired over the same files, mean ± standard error of the difference):", ""]
    full = table[("full", 512)]
    for m in methods_in(table):
        cells_m = table.get((m, 512), {})
        common = sorted(full.keys() & cells_m.keys())
        if m == "full" or not common:
            continue
        diff = 100 * np.array([cells_m[s]["edit_similarity"] - full[s]["edit_similarity"] for s in common])
        error = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        verdict = "met" if diff.mean() >= -2 else "missed"
        lines.append(f"- {m}: {diff.mean():+.1f} ± {error:.1f} points ({verdict}); at least full's on "
                     f"{int((diff >= 0).sum())}/{len(diff)} files")
    return lines


def summarize(root: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Issue 18 study: KV-cache methods on three real models", ""]
    present = [s for s in MODELS if (root / s).is_dir()]
    fidelity_of = {s: cells(root / s, "fidelity") for s in present}
    # A panel per model with a curve to draw: folders of one budget only have their tables.
    curves = [s for s in present if len({b for _, b in fidelity_of[s]}) > 1]
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
    panels = dict(zip(curves, axes[0]))
    # One colour per method across the panels, one legend for the figure.
    colours, lines_by_method = {}, {}
    for short in present:
        folder, name = root / short, MODELS[short]
        fidelity = fidelity_of[short]
        lines += [f"## {name}", ""]
        if fidelity:
            samples = len({s for v in fidelity.values() for s in v})
            lines += [f"Fidelity: KL(full ‖ method) per position after the first eviction, mean ± std over "
                      f"{samples} texts of 4,096 tokens (code, prose, self-generated).", ""]
            lines += metric_table(fidelity, "kl", 4) + [""]
            lines += ["Targets at budget 512 (paired over the same texts):", ""]
            # The paper's scorer against the same bound, for the models the fit has not run on yet.
            pairs = [(fit, other, bound) for fit in (FIT, FIT_UNMIXED, FIT_NEXT, FIT_REST)
                     for other, bound in (("streaming", 0.5), ("triattention", 0.85))]
            bounds = [(oracle, other, bound) for oracle in ORACLES
                      for other, bound in (("streaming", 0.5), ("triattention", 0.85))]
            for fit, other, bound in [*pairs, ("triattention", "streaming", 0.5), *bounds]:
                a, b, wins, n = paired(fidelity, fit, other, 512)
                if n:
                    verdict = "met" if a <= bound * b else "missed"
                    lines.append(f"- {fit} / {other}: {a:.4f} / {b:.4f} = {a / b:.2f}x (target <= {bound}x: "
                                 f"{verdict}); lower on {wins}/{n} texts")
            for b in sorted({b for _, b in fidelity}):
                # The fit's history rows are the same method: where the current fit ran, the
                # runner-up is the best rival.
                history = (FIT_UNMIXED, FIT_NEXT, FIT_REST) if (FIT, b) in fidelity else ()
                ranked = sorted((np.mean([c["kl"] for c in fidelity[(m, b)].values()]), m)
                                 for m in methods_in(fidelity)
                                 if (m, b) in fidelity and m not in (*ORACLES, *history))
                lines.append(f"- budget {b}: lowest KL {ranked[0][1]} ({ranked[0][0]:.4f}), then {ranked[1][1]} "
                             f"({ranked[1][0]:.4f})")
            lines.append("")
            if POOLED.get(short) in fidelity_of:
                lines += pooled_targets(fidelity, fidelity_of[POOLED[short]], POOLED[short])
            if short in panels:
                ax = panels[short]
                for m in methods_in(fidelity):
                    budgets = sorted(b for mm, b in fidelity if mm == m)
                    means = [np.mean([c["kl"] for c in fidelity[(m, b)].values()]) for b in budgets]
                    index = colours.setdefault(m, len(colours))
                    dashed = index >= 10 or m in (FIT_UNMIXED, FIT_NEXT, FIT_REST)  # past the ten colours, or history
                    lines_by_method[m], = ax.plot(budgets, means, marker="o", label=m, color=f"C{index % 10}",
                                                  linestyle="--" if dashed else "-")
                every_budget = sorted({b for _, b in fidelity})
                ax.set(xscale="log", yscale="log", xlabel="KV budget (of 4,096 tokens)", ylabel="mean KL", title=name)
                ax.set_xticks(every_budget, [str(b) for b in every_budget])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for task, metrics in (("needle", ("exact_match",)), ("code", ("exact_match", "edit_similarity"))):
            table = cells(folder, task)
            if not table:
                continue
            if task == "code":
                table = one_sample_per_file(table)
            samples = len({s for v in table.values() for s in v})
            what = ("Pass-key retrieval (filler of at least 4 budgets)" if task == "needle"
                    else "Code completion (next 2 lines of a held-out stdlib file after ~4,096 tokens)")
            for metric in metrics:
                lines += [f"{what}: {metric}, mean ± std over {samples} samples.", ""]
                lines += metric_table(table, metric, 3) + [""]
            if task == "code" and ("full", 512) in table:
                lines += code_target(table) + [""]
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(lines_by_method.values(), lines_by_method.keys(), loc="center right", fontsize=8)
    fig.savefig(root / "fidelity_kl.png", dpi=110)
    (root / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    summarize(Path(sys.argv[1]))
