"""Turning prompt text into token ids."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
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


def token_fingerprint(tokens: Sequence[int] | np.ndarray) -> str:
    """A short hash (16 hex digits) of token ids as int32: names a text that was evaluated or
    fitted on, so that studies can show the two never overlap."""
    return hashlib.sha256(np.asarray(tokens, np.int32).tobytes()).hexdigest()[:16]
