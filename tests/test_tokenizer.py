"""The tokenizer built from GGUF metadata without torch, against transformers' GGUF reader."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from triattention_jax.checkpoints import gguf
from triattention_jax.checkpoints.tokenizer import tokenizer_from_gguf
from triattention_jax.errors import UserError

_STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = [
    "What is the capital of France?",
    "In 2024, 3.14159 and 1,000,000 people; 0x1F, 1e-9, v2.5.1.",
    "def f(x):\n    return x**2  # square\n\n\n\tTabs\r\nand CRLF\rCR",
    "Ünïcödé — “quotes” 中文字符 日本語 한국어 🚀🔥 emoji",
    "  leading spaces and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> special tokens inside text",
    "it's we're they'll I'M DON'T",
    "",
    *[(_STDLIB / name).read_text()[:20000] for name in ("_pydecimal.py", "json/encoder.py", "textwrap.py")],
]


@pytest.fixture(scope="module")
def gguf_metadata():
    from gguf import GGUFReader

    reader = GGUFReader(gguf.gguf_path())
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(gguf_metadata):
    return tokenizer_from_gguf(gguf_metadata)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = gguf.gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_ids_equal_transformers_reader_with_the_files_digit_split(ours, reference):
    # The file's pre-tokenizer type is "smollm": llama.cpp splits every digit off before
    # GPT-2's regex, as SmolLM2's own tokenizer.json does (Digits, then ByteLevel). transformers'
    # GGUF reader applies GPT-2's regex alone; with that one step added, every id must agree.
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), reference.backend_tokenizer.pre_tokenizer]
    )
    for text in CORPUS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text[:60]
        assert ours.decode(ours(text)["input_ids"]) == text


def test_digits_are_split_as_the_files_pre_tokenizer_says(ours):
    # "\n    0": the whitespace stays one piece and the digit stands alone.
    assert ours.convert_ids_to_tokens(ours("\n    0")["input_ids"]) == ["ĊĠĠĠĠ", "0"]
    assert all(len(token.strip("Ġ")) <= 1 for token in ours.convert_ids_to_tokens(ours("12345 67890")["input_ids"]))


def test_special_tokens_and_chat_template_equal_the_reader(ours, reference):
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(reference, name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    ) == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_unsupported_tokenizers_are_refused(gguf_metadata):
    with pytest.raises(UserError, match="tokenizer model 'llama'"):
        tokenizer_from_gguf({**gguf_metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(UserError, match="pre-tokenizer 'made-up'"):
        tokenizer_from_gguf({**gguf_metadata, "tokenizer.ggml.pre": "made-up"})
