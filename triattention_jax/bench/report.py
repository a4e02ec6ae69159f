"""The benchmark's rows and tables, and the environment it ran in."""

from __future__ import annotations

import dataclasses
import platform
from datetime import datetime, timezone
from typing import Any

import jax

from triattention_jax.kernels import decode_attention


def environment() -> dict[str, Any]:
    import flax
    import transformers

    env = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "decode_kernel": decode_attention.supported(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return env


def step_row(step, roofline: float) -> dict[str, Any]:
    """A `speed.StepTime` as a row, its bytes/s against the `roofline` (bytes/s)."""
    achieved = step.bytes_per_step / step.step_seconds
    return {
        **dataclasses.asdict(step),
        "tokens_per_second": step.tokens_per_second,
        "bytes_per_second": achieved,
        "roofline_fraction": achieved / roofline,
    }


def format_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format); empty where a row lacks the key or holds None."""
    table = [[format(row[k], f) if row.get(k) is not None else "" for _, k, f in columns] for row in rows]
    widths = [max(len(h), 9, *(len(cells[i]) for cells in table)) for i, (h, _, _) in enumerate(columns)]
    lines = ["".join(h.rjust(w + 1) for (h, _, _), w in zip(columns, widths))]
    lines += ["".join(c.rjust(w + 1) for c, w in zip(cells, widths)) for cells in table]
    return "\n".join(lines)


STEP_COLUMNS = [
    ("method", "method", ""),
    ("kv_cache", "kv_cache", ""),
    ("batch", "batch", "d"),
    ("slots", "slots", "d"),
    ("filled", "filled", "d"),
    ("ms/step", "ms", ".2f"),
    ("tok/s", "tokens_per_second", ".1f"),
    ("GB/step", "gb", ".2f"),
    ("roofline", "roofline_fraction", ".1%"),
    ("evict", "eviction_share", ".1%"),
]
RUN_COLUMNS = [
    ("method", "method", ""),
    ("kv_cache", "kv_cache", ""),
    ("batch", "batch", "d"),
    ("KV MiB/seq", "kv_mib_per_sequence", ".1f"),
    ("tok/s", "tokens_per_second", ".1f"),
    ("e2e tok/s", "e2e_tokens_per_second", ".1f"),
    ("e2e pred", "e2e_predicted_tokens_per_second", ".1f"),
    ("HF eager", "hf_eager_tokens_per_second", ".1f"),
    ("HF compiled", "hf_compiled_tokens_per_second", ".1f"),
    ("roofline", "roofline_fraction", ".1%"),
    ("last step", "final_roofline_fraction", ".1%"),
    ("evict", "eviction_share", ".1%"),
]
SCALING_COLUMNS = [
    ("method", "method", ""),
    ("kv_cache", "kv_cache", ""),
    ("devices", "devices", "d"),
    ("mesh", "mesh", ""),
    ("batch", "batch", "d"),
    ("tok/s", "tokens_per_second", ".1f"),
    ("speed-up", "speed_up", ".2f"),
    ("collectives", "collective_share", ".1%"),
]


def scaling_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and cache layout, one row per device count: its largest-batch run (its
    largest batch when none was sized) and its tokens/s over the fewest devices' row."""
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in runs:
        key = (run["method"], run["kv_cache"], run["devices"])
        held = best.get(key)
        if held is None or (run["largest_batch"], run["batch"]) > (held["largest_batch"], held["batch"]):
            best[key] = run
    rows = []
    for (method, kv_cache, _), run in sorted(best.items()):
        first = min((r for k, r in best.items() if k[:2] == (method, kv_cache)), key=lambda r: r["devices"])
        rows.append({**run, "speed_up": run["tokens_per_second"] / first["tokens_per_second"]})
    return rows
