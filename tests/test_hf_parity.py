"""Our decoder against Hugging Face transformers on tiny random checkpoints (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_MODELS

from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.decoding import generate, teacher_force

SEQ_LEN = 576


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tokens(seed: int, length: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 512, size=(batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_logits_match_hf(tiny_model_dirs, name):
    tokens = _tokens(0, SEQ_LEN)
    with torch.no_grad():
        reference = _hf_model(tiny_model_dirs[name])(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    transformer = load_transformer(tiny_model_dirs[name], dtype="float32")
    ours = teacher_force(transformer, tokens, prefill_length=SEQ_LEN)
    reference_logprobs = torch.log_softmax(torch.tensor(reference), -1).numpy()
    relative = np.abs(ours - reference_logprobs).max() / np.abs(reference_logprobs).max()
    assert relative < 1e-4, f"{name}: relative log-prob error {relative:.2e}"
    # Logits themselves, through the raw forward pass.
    import jax.numpy as jnp

    positions = jnp.broadcast_to(jnp.arange(SEQ_LEN), tokens.shape)
    logits = transformer.extend(None, jnp.asarray(tokens), positions).logits
    relative = np.abs(np.asarray(logits) - reference).max() / np.abs(reference).max()
    assert relative < 1e-4, f"{name}: relative logit error {relative:.2e}"


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_cached_decoding_equals_full_forward(tiny_model_dirs, name):
    tokens = _tokens(1, 300, batch=2)
    transformer = load_transformer(tiny_model_dirs[name], dtype="float32")
    full = teacher_force(transformer, tokens, prefill_length=300)
    stepped = teacher_force(transformer, tokens, prefill_length=5, divide_length=32)
    np.testing.assert_allclose(stepped, full, rtol=0, atol=2e-4 * np.abs(full).max())


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_greedy_matches_hf_generate(tiny_model_dirs, name):
    prompt = _tokens(2, 23)
    hf = _hf_model(tiny_model_dirs[name])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(prompt, dtype=torch.long),
            max_new_tokens=64,
            do_sample=False,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
        )[0, 23:].tolist()
    transformer = load_transformer(tiny_model_dirs[name], dtype="float32")
    ours = generate(transformer, prompt.tolist(), eos_ids=(), max_new_tokens=64, divide_length=16).token_ids[0]
    assert ours == expected
