"""Resumable results: one folder per study, a cell per (task, method, budget, sample)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import jax

from triattention_jax.checkpoints.stats import model_fingerprint
from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH
from triattention_jax.errors import UserError
from triattention_jax.files import write_json_atomic


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
                raise UserError(
                    f"{folder} holds results without a record of their settings (model, dtype, --seq_len): "
                    "use a new --out"
                )
            recorded = _read_json_object(self.settings_path)
            for name, value in settings.items():
                if recorded.get(name) != value:
                    raise UserError(
                        f"{folder} holds results computed with {name}={recorded.get(name)!r}, this run has "
                        f"{name}={value!r}: use a new --out, or the same settings to add cells"
                    )
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
            if (
                (cell_task, int(cell_sample)) == (task, sample)
                and budget in (None, int(cell_budget))
                and cell.get("input", fingerprint) != fingerprint
            ):
                raise UserError(
                    f"{self.path} holds {task} sample {sample} computed on another text (texts come from the "
                    f"running Python's standard library; this is Python {platform.python_version()}): "
                    f"use a new --out"
                )


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


def check_output_folder(out: Path) -> None:
    """Refuses, before any work, an --out that is a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give a folder name")
