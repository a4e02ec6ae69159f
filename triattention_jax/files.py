"""Result files written atomically: probed before any work, written to a temporary name beside
the target, then renamed, so a failure never leaves a half-written or stray file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from triattention_jax.errors import UserError


def check_writable(path: str) -> None:
    """Fails early, before any work, when an output file cannot be written: creates (and
    removes) the temporary file the result will be written to."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {target.parent.resolve()} does not exist")
    tmp = _temporary_name(target)
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes to a temporary name beside the target, then renames: never a half-written file."""
    target = Path(path).expanduser()
    tmp = _temporary_name(target)
    try:
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only; plots are the `[plots]` extra (calling this
    first lets a command refuse before any work when it is missing)."""
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("plots need matplotlib: pip install 'triattention-jax[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
