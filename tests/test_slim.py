"""Slim attention (K-only cache) on tiny random MHA checkpoints, against transformers (float32)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import REPO_ROOT, SLIM_MODELS
from test_cli import _decode, _error_line

from triattention_jax.bench.presets import PRESETS, random_stats
from triattention_jax.cache import KVCache, cache_nbytes
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.config import ModelConfig
from triattention_jax.decoding import generate, teacher_force
from triattention_jax.errors import UserError
from triattention_jax.policies import RandomEviction, RoundContext, StreamingLLM, TriAttention
from triattention_jax.slim import logprob_error, slim_transformer


def _tokens(seed: int, length: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 512, size=(batch, length)).astype(np.int32)


@pytest.fixture(scope="module")
def models(slim_model_dirs):
    """name -> (standard, slim) float32 transformers sharing weights."""
    out = {}
    for name, path in slim_model_dirs.items():
        standard = load_transformer(path, dtype="float32")
        out[name] = (standard, slim_transformer(standard)[0])
    return out


@pytest.mark.parametrize("name", sorted(SLIM_MODELS))
def test_slim_decoding_matches_hf(slim_model_dirs, models, name):
    standard, slim = models[name]
    assert slim.slim and not standard.slim
    hf = transformers.AutoModelForCausalLM.from_pretrained(slim_model_dirs[name], dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompt = _tokens(2, 23)
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(prompt, dtype=torch.long),
            max_new_tokens=48,
            do_sample=False,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
        )[0, 23:].tolist()
    assert generate(slim, prompt.tolist(), eos_ids=(), max_new_tokens=48, divide_length=16).token_ids[0] == expected
    # Every position after the first 8 is decoded one token at a time from the K-only cache.
    tokens = _tokens(0, 136)
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor(tokens, dtype=torch.long)).logits, -1).numpy()
    ours = teacher_force(slim, tokens, prefill_length=8, divide_length=64)
    relative = np.abs(ours - reference).max() / np.abs(reference).max()
    assert relative < 1e-4, f"{name}: relative log-prob error {relative:.2e}"


def test_k_only_cache_holds_exactly_half_the_payload(models):
    standard, slim = models["llama-mha-yarn"]
    prompts = _tokens(3, 40, batch=2).tolist()
    full = generate(standard, prompts, eos_ids=(), max_new_tokens=16, divide_length=16)
    half = generate(slim, prompts, eos_ids=(), max_new_tokens=16, divide_length=16)
    assert half.token_ids == full.token_ids
    # K/V payload: exactly half. The whole buffer also holds int32 positions, which both keep.
    assert 2 * half.kv_payload_bytes == full.kv_payload_bytes
    config, slots = standard.config, 64 + 16
    assert full.kv_cache_bytes == cache_nbytes(config, 2, slots, jnp.float32)
    assert half.kv_cache_bytes == cache_nbytes(config, 2, slots, jnp.float32, values=False)
    assert full.kv_cache_bytes - half.kv_cache_bytes == half.kv_payload_bytes


def test_refuses_models_it_cannot_invert(tiny_model_dirs):
    with pytest.raises(UserError, match=r"square W_K.*4 query / 2 KV heads"):
        slim_transformer(load_transformer(tiny_model_dirs["llama-tied"], dtype="float32"))
    with pytest.raises(UserError, match="k_norm is nonlinear"):
        slim_transformer(load_transformer(tiny_model_dirs["qwen3-tied"], dtype="float32"))


def test_condition_numbers_and_bfloat16_threshold(slim_model_dirs, models):
    standard, _ = models["qwen2-mha"]
    _, report = slim_transformer(standard)
    wk = [np.asarray(layer.wk[...], np.float64).reshape(64, 64) for layer in standard.layers]
    np.testing.assert_allclose(report.cond, [np.linalg.cond(w) for w in wk], rtol=1e-9)
    assert report.max_cond == 2.0**24
    # bfloat16 rounding amplified by cond(W_K) > 256 = 1/u: those layers keep V.
    bf16 = load_transformer(slim_model_dirs["qwen2-mha"], dtype="bfloat16")
    slim_bf16, bf16_report = slim_transformer(bf16)
    assert bf16_report.max_cond == 256
    assert 1 in bf16_report.fallback_layers
    assert bf16_report.fallback_layers == tuple(i for i, c in enumerate(report.cond) if c > 256)
    assert slim_bf16.value_layers == tuple(i in bf16_report.fallback_layers for i in range(3))
    assert all(slim_transformer(bf16, max_cond=1e4)[0].layers[i].w_kv[...].dtype == jnp.float32 for i in range(3))
    with pytest.raises(UserError, match=r"cond\(W_K\) exceeds 10 in every layer .*--slim_max_cond"):
        slim_transformer(bf16, max_cond=10)


def test_value_map_dtype_follows_the_measured_rounding(slim_model_dirs):
    """bfloat16 model, auto: W_KV stays float32 where rounding it to bfloat16 would add more
    error to the recovered values than a standard cache's rounding of V (the random layers,
    cond(W_K) 140 to 1,060), and is bfloat16 in a layer where W_KV is exactly representable
    (W_K = 2·I, so W_KV = W_V / 2). Forcing bfloat16 everywhere raises the log-prob error."""
    path = slim_model_dirs["qwen2-mha"]
    bf16 = load_transformer(path, dtype="bfloat16")
    slim, report = slim_transformer(bf16, max_cond=1e4)
    assert report.value_map_dtypes == ("float32",) * 3
    for error in report.value_errors:
        assert 2.0**-11 < error.cache_rounding < 2.0**-8
        assert error.value_map_rounding > error.cache_rounding and not error.model_dtype_allowed
    exact = load_transformer(path, dtype="bfloat16")
    d = exact.config.hidden_size
    exact.layers[0].wk[...] = (2 * jnp.eye(d, dtype=jnp.bfloat16)).reshape(exact.layers[0].wk[...].shape)
    mixed, mixed_report = slim_transformer(exact, max_cond=1e4)
    assert mixed_report.value_map_dtypes == ("bfloat16", "float32", "float32")
    assert mixed_report.value_errors[0].value_map_rounding == 0.0
    assert mixed.layers[0].w_kv[...].dtype == jnp.bfloat16 and mixed.layers[1].w_kv[...].dtype == jnp.float32
    tokens = _tokens(5, 80, batch=2)
    all_float32, _ = slim_transformer(exact, max_cond=1e4, value_map="float32")
    np.testing.assert_array_equal(
        teacher_force(mixed, tokens, prefill_length=16, divide_length=32),
        teacher_force(all_float32, tokens, prefill_length=16, divide_length=32),
    )
    reference = teacher_force(load_transformer(path, dtype="float32"), tokens, prefill_length=16, divide_length=32)

    def kl(model):
        ours = teacher_force(model, tokens, prefill_length=16, divide_length=32)[:, 16:]
        return float((np.exp(reference[:, 16:]) * (reference[:, 16:] - ours)).sum(-1).mean())

    forced, forced_report = slim_transformer(bf16, max_cond=1e4, value_map="model")
    assert forced_report.value_map_dtypes == ("bfloat16",) * 3 and not any(forced_report.value_errors)
    assert kl(forced) > 1.3 * kl(slim)
    float32_model = load_transformer(path, dtype="float32")
    assert slim_transformer(float32_model)[1].value_map_dtypes == ("float32",) * 3
    with pytest.raises(UserError, match="unknown W_KV dtype 'half'"):
        slim_transformer(bf16, value_map="half")


def test_layers_above_the_threshold_keep_values(models):
    """A bound between the layers' condition numbers: the worse layers keep a K+V cache, the
    rest hold K only, and decoding still matches the standard cache."""
    standard, _ = models["llama-mha-yarn"]
    conds = slim_transformer(standard)[1].cond
    mixed, report = slim_transformer(standard, max_cond=float(np.median(conds)))
    assert report.fallback_layers and len(report.fallback_layers) < len(conds)
    assert mixed.value_layers == tuple(c > np.median(conds) for c in conds)
    tokens = _tokens(6, 72, batch=2)
    a = teacher_force(standard, tokens, prefill_length=8, divide_length=32)
    b = teacher_force(mixed, tokens, prefill_length=8, divide_length=32)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())
    full = generate(standard, tokens[:, :20].tolist(), eos_ids=(), max_new_tokens=12, divide_length=16)
    part = generate(mixed, tokens[:, :20].tolist(), eos_ids=(), max_new_tokens=12, divide_length=16)
    assert part.token_ids == full.token_ids
    layers = len(conds)
    assert 2 * layers * part.kv_payload_bytes == full.kv_payload_bytes * (layers + sum(mixed.value_layers))


def test_measured_float32_error(models):
    standard, slim = models["llama-mha-yarn"]
    error = logprob_error(standard, slim, _tokens(4, 96, batch=2), prefill_length=16)
    assert error["relative"] < 1e-5 and error["top1_agreement"] == 1.0


def test_eviction_keeps_one_token_set_per_layer(models):
    """TriAttention per_layer (and any position-only policy) selects the same tokens with either
    cache, so the K-only cache decodes exactly like the standard one; per-head modes are refused."""
    standard, slim = models["llama-mha-yarn"]
    stats = random_stats(standard)
    tokens = _tokens(5, 120, batch=2)
    for policy in (
        TriAttention.create(standard, stats, budget=48, aggregation="per_layer"),
        StreamingLLM(budget=48, window=16),
    ):
        a = teacher_force(standard, tokens, prefill_length=40, policy=policy, divide_length=16)
        b = teacher_force(slim, tokens, prefill_length=40, policy=policy, divide_length=16)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())
    with pytest.raises(UserError, match="--aggregation per_layer"):
        generate(
            slim,
            tokens[:, :20].tolist(),
            eos_ids=(),
            max_new_tokens=4,
            policy=TriAttention.create(standard, stats, budget=64),
        )


def test_per_head_scores_are_shared_across_heads_of_a_k_only_cache():
    L, B, K, S = 2, 2, 4, 32
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (L, B, K, S))
    keys = jax.random.normal(jax.random.key(0), (L, B, K, S, 8))
    cache = KVCache.from_stacked(k=keys, v=None, pos=pos, cursor=jnp.asarray(S))
    context = RoundContext(prompt_lengths=jnp.zeros(B, jnp.int32), position=jnp.full(B, S, jnp.int32))
    kept = RandomEviction(budget=12).compact(cache, context)
    kept_pos = kept.stacked("pos")
    assert all(kept.key_only_layers) and kept.stacked("k").shape == (L, B, 12, K, 8)  # slot-major
    np.testing.assert_array_equal(kept_pos, jnp.broadcast_to(kept_pos[:, :, :1], kept_pos.shape))
    # The standard cache keeps per-head sets (the draws differ per head).
    standard_cache = KVCache.from_stacked(k=keys, v=keys, pos=pos, cursor=jnp.asarray(S))
    standard = RandomEviction(budget=12).compact(standard_cache, context).stacked("pos")
    assert not np.array_equal(standard[:, :, 0], standard[:, :, 1])


def test_cli_refuses_gqa_model():
    result = _decode("--prompt", "Hi", "--kv_cache", "slim", "--max_new_tokens", "4")
    assert result.returncode == 2
    assert _error_line(result).startswith("error: --kv_cache slim needs multi-head attention")


def test_benchmark_times_both_cache_layouts(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "triattention_jax.cli.benchmark",
            "--preset",
            "tiny-mha",
            "--methods",
            "streaming",
            "--kv_cache",
            "standard,slim",
            "--budget",
            "64",
            "--new_tokens",
            "128",
            "--batch",
            "1",
            "--dtype",
            "float32",
            "--prompt_tokens",
            "32",
            "--divide_length",
            "32",
            "--e2e_tokens",
            "0",
            "--nohf",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    runs = {(row["method"], row["kv_cache"]): row for row in json.loads(out.read_text())["runs"]}
    config = ModelConfig.from_hf(PRESETS["tiny-mha"])
    for method in ("streaming",):
        standard, slim = runs[method, "standard"], runs[method, "slim"]
        slots = standard["kv_bytes_per_sequence"] // cache_nbytes(config, 1, 1, jnp.float32)
        assert standard["kv_bytes_per_sequence"] == cache_nbytes(config, 1, slots, jnp.float32)
        assert slim["kv_bytes_per_sequence"] == cache_nbytes(config, 1, slots, jnp.float32, values=False)
        # W_KV (D×D float32 per layer) is the price in weights.
        assert slim["weight_bytes"] - standard["weight_bytes"] == config.num_layers * config.hidden_size**2 * 4


def test_cli_reports_fallback_layers_and_measured_error(tmp_path, slim_model_dirs, models):
    """decode.py --kv_cache slim on a tiny MHA checkpoint given a byte-level tokenizer: the
    layers above --slim_max_cond keep V, and the measured log-prob error is printed and saved."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as token_models

    model = tmp_path / "mha"
    shutil.copytree(slim_model_dirs["llama-mha-yarn"], model)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(token_models.BPE(vocab={c: i + 3 for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(model)
    conds = slim_transformer(models["llama-mha-yarn"][0])[1].cond
    out = tmp_path / "out.json"
    result = _decode(
        "--model",
        str(model),
        "--prompt",
        "Hello there",
        "--chat=false",
        "--kv_cache",
        "slim",
        "--dtype",
        "float32",
        "--slim_max_cond",
        str(float(np.median(conds))),
        "--max_new_tokens",
        "24",
        "--ignore_eos",
        "--output_json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    fallback = [i for i, c in enumerate(conds) if c > np.median(conds)]
    assert f"layers keeping K and V: {', '.join(map(str, fallback))}" in result.stderr
    assert "measured against the standard cache" in result.stderr
    slim = json.loads(out.read_text())["slim"]
    assert slim["fallback_layers"] == fallback
    assert slim["logprob_error"]["relative"] < 1e-4 and slim["logprob_error"]["top1_agreement"] == 1.0
