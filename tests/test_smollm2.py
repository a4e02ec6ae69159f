"""The real model: SmolLM2-135M-Instruct against transformers reading the same GGUF file."""

from __future__ import annotations

import pytest
import torch
from conftest import load_gguf_reference

from triattention_jax.checkpoints import gguf
from triattention_jax.checkpoints.store import load_model
from triattention_jax.decoding import generate
from triattention_jax.prompts import encode_prompts

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain step by step how to compute the greatest common divisor of 84 and 36.",
]


@pytest.fixture(scope="module")
def ours():
    return load_model(gguf.DEFAULT_MODEL_NAME, dtype="float32")


@pytest.fixture(scope="module")
def reference():
    return load_gguf_reference(gguf.gguf_path())


def test_converted_tokenizer_matches_gguf_reader(ours, reference):
    hf_tokenizer, _ = reference
    texts = PROMPTS + ["What is the capital of France?"]
    assert encode_prompts(ours.tokenizer, texts, chat=True) == encode_prompts(hf_tokenizer, texts, chat=True)


@pytest.mark.slow
def test_greedy_64_tokens_match_transformers(ours, reference):
    hf_tokenizer, hf_model = reference
    prompt_ids = encode_prompts(ours.tokenizer, PROMPTS, chat=True)
    hf_model.generation_config.eos_token_id = None
    expected = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=64,
                do_sample=False,
            )
        expected.append(out[0, len(ids) :].tolist())
    # Both prompts in one batch of different lengths, decoded past EOS like the reference.
    result = generate(ours.transformer, prompt_ids, eos_ids=(), max_new_tokens=64)
    assert result.num_decode_steps == 64  # within its first round of 128, a run stops at its tokens
    for got, want in zip(result.token_ids, expected):
        assert len(want) == 64
        assert got == want, f"diverged at token {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"


def test_france_answers_paris(ours):
    prompt_ids = encode_prompts(ours.tokenizer, ["What is the capital of France?"], chat=True)
    result = generate(ours.transformer, prompt_ids, max_new_tokens=32, eos_ids=ours.config.eos_token_ids)
    text = ours.tokenizer.decode(result.token_ids[0], skip_special_tokens=True)
    assert "Paris" in text
    assert result.token_ids[0][-1] in ours.config.eos_token_ids
