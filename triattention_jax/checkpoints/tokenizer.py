"""Tokenizers without torch: loading a checkpoint's, and building one from GGUF metadata.

transformers imports torch when it reads a GGUF file, so the byte-level BPE tokenizer a GGUF
describes is assembled here with `tokenizers` and wrapped as a fast tokenizer (which needs
no torch). Everything that imports transformers on the main path goes through
`_transformers()`, which silences its "PyTorch was not found" advisory: this package never
uses transformers' models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from triattention_jax.errors import UserError

# Pre-tokenizer split patterns, by GGUF `tokenizer.ggml.pre`: each names how the vocabulary's
# merges were learned (llama.cpp's pre-tokenizer types).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE_TYPE = {
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
}
# GPT-2's own split (ByteLevel's built-in regex), with each digit split off first for "smollm".
_GPT2_PRE_TYPES = ("default", "gpt2", "gpt-2", "smollm")
SUPPORTED_PRE_TYPES = tuple(sorted((*_SPLIT_BY_PRE_TYPE, *_GPT2_PRE_TYPES)))

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _transformers() -> Any:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    return transformers


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved in a checkpoint folder. A `tokenizer.json` holds the whole fast
    tokenizer, so it is read as one directly: `AutoTokenizer` would also import the model
    configuration code, which imports torch wherever torch is installed."""
    transformers = _transformers()
    loader = (
        transformers.PreTrainedTokenizerFast if (model_dir / "tokenizer.json").exists() else transformers.AutoTokenizer
    )
    try:
        return loader.from_pretrained(str(model_dir))
    except Exception as e:
        raise UserError(f"cannot load the tokenizer from {model_dir} ({type(e).__name__}: {e})") from e


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Any:
    """A fast tokenizer from a GGUF file's `tokenizer.*` metadata (values as `GGUFReader`'s
    `field.contents()` gives them): byte-level BPE (`tokenizer.ggml.model` "gpt2"), with the
    file's special tokens and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre_type = metadata.get("tokenizer.ggml.pre", "default")
    if pre_type not in SUPPORTED_PRE_TYPES:
        raise UserError(
            f"GGUF pre-tokenizer {pre_type!r} is not supported (supported: {', '.join(SUPPORTED_PRE_TYPES)})"
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False))
    if pre_type in _SPLIT_BY_PRE_TYPE:
        split = [pre_tokenizers.Split(Regex(_SPLIT_BY_PRE_TYPE[pre_type]), behavior="isolated")]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        digits = [pre_tokenizers.Digits(individual_digits=True)] if pre_type == "smollm" else []
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == _CONTROL]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types)
            if kind == _USER_DEFINED
        ]
    )

    def special(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos = special("bos")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
