"""Resumable results: one folder per study, a cell per (task, method, budget, sample)."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from triattention_jax.checkpoints.stats import model_fingerprint
from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH
from triattention_jax.errors import UserError
from triattention_jax.files import write_json_atomic

# Settings recorded since a later session, with the value every folder written before ran with.
LATER_SETTINGS: dict[str, Any] = {"slack_trigger": False, "text_files": [], "fitted_scorers": {}}
# Settings that are per method (name -> value): a run may add methods, never change one's value.
PER_METHOD_SETTINGS = frozenset({"fitted_scorers"})


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
                was = recorded.get(name, LATER_SETTINGS.get(name))
                if name in PER_METHOD_SETTINGS:
                    changed = {m: v for m, v in value.items() if m in was and was[m] != v}
                    value, was = changed, {m: was[m] for m in changed}
                if was != value:
                    raise UserError(
                        f"{folder} holds results computed with {name}={was!r}, this run has "
                        f"{name}={value!r}: use a new --out, or the same settings to add cells"
                    )
            settings = {
                **recorded,
                **settings,
                **{n: {**recorded.get(n, {}), **settings[n]} for n in PER_METHOD_SETTINGS & settings.keys()},
            }
        write_json_atomic(str(self.settings_path), settings)

    @staticmethod
    def key(task: str, method: str, budget: int, sample: int) -> str:
        return f"{task}/{method}/{budget}/{sample}"

    @staticmethod
    def parse_key(key: str) -> tuple[str, str, int, int]:
        """(task, method, budget, sample) of a `key` (a method variant may hold '/' in a path)."""
        task, rest = key.split("/", 1)
        method, budget, sample = rest.rsplit("/", 2)
        return task, method, int(budget), int(sample)

    def put(self, key: str, cell: dict[str, Any]) -> None:
        self.cells[key] = cell
        write_json_atomic(str(self.path), self.cells)

    def check_input(self, task: str, sample: int, fingerprint: str, budget: int | None = None) -> None:
        """Refuses to mix, in one folder, cells of a sample computed on different inputs (at
        `budget` only, for inputs that depend on it)."""
        for key, cell in self.cells.items():
            cell_task, _, cell_budget, cell_sample = self.parse_key(key)
            if (
                (cell_task, cell_sample) == (task, sample)
                and budget in (None, cell_budget)
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


def run_settings(
    model: LoadedModel,
    seq_len: int,
    *,
    slack_trigger: bool = False,
    text_files: Sequence[str] = (),
    fitted_scorers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Everything besides (task, method, budget, sample) that a cell's numbers depend on;
    text_files: the SHA-256 of each `--text_file`, in order (empty: the built-in texts);
    fitted_scorers: per triattention_fit method, a fingerprint of its weights."""
    return {
        "model": model.name,
        "weights": model_fingerprint(model.transformer),
        "dtype": str(model.transformer.dtype),
        "seq_len": seq_len,
        "divide_length": DEFAULT_DIVIDE_LENGTH,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "slack_trigger": slack_trigger,
        "text_files": list(text_files),
        "fitted_scorers": dict(fitted_scorers or {}),
    }


def check_output_folder(out: Path) -> None:
    """Refuses, before any work, an --out that is a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give a folder name")
