"""Turning prompt text into token ids, and writing result files atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from triattention_jax.errors import UserError


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer: Any, texts: Sequence[str], *, chat: bool) -> list[list[int]]:
    """Token ids per prompt; with `chat`, each text is one user turn of the chat template."""
    if chat and not has_chat_template(tokenizer):
        raise UserError("this tokenizer has no chat template: pass --nochat to feed prompts as plain text")
    encoded = []
    for text in texts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(text)["input_ids"]
        encoded.append([int(i) for i in ids])
    return encoded


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompt_file {path}: {e}") from e
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompt_file {path} holds no prompts (one prompt per line)")
    return prompts


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
