"""Shared fixtures: tiny random Hugging Face checkpoints, written with save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = Path(__file__).resolve().parent.parent

# The files that take a minute or more, longest first (from `--durations` of the fresh-clone CI,
# 2026-12-03): they start first, so the two workers (`--dist loadfile`, files in collection
# order) end together instead of one of them starting a long file near the end.
LONG_FILES = (
    "test_qwen.py",
    "test_sharding.py",
    "test_calibration.py",
    "test_notebook.py",
    "test_eval_tasks.py",
    "test_evaluation.py",
    "test_smollm2.py",
    "test_readme.py",
    "test_gguf.py",
    "test_decode_attention.py",
    "test_bad_inputs.py",
    "test_slack_trigger.py",
    "test_slim.py",
    "test_text_file.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

# Eight query heads over four KV heads (a model axis of 4 fits; the checkpoints below have two
# KV heads), for models built directly from random weights.
WIDE = dict(
    model_type="qwen3",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)


def random_transformer(hf: dict):
    """A float32 Transformer of the config `hf` with random weights large enough (0.2) that
    attention is peaked: scores then rarely tie, so kept sets do not hinge on float rounding."""
    import jax.numpy as jnp
    import numpy as np

    from triattention_jax.config import ModelConfig
    from triattention_jax.model import Transformer, weight_specs

    config = ModelConfig.from_hf(hf)
    rng = np.random.default_rng(0)
    weights = {
        name: (1.0 + 0.1 * rng.normal(size=shape) if name.endswith("norm") else 0.2 * rng.normal(size=shape)).astype(
            np.float32
        )
        for name, (shape, _) in weight_specs(config).items()
    }
    return Transformer(config, weights, dtype=jnp.float32)


# name -> (model_type, extra config); covers llama3 RoPE scaling, Qwen2 biases, Qwen3 qk-norm,
# tied and untied embeddings.
TINY_MODELS = {
    "llama3-untied": (
        "llama",
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            ),
        ),
    ),
    "llama-tied": (
        "llama",
        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    ),
    "qwen2-untied": (
        "qwen2",
        dict(tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
    "qwen3-tied": (
        "qwen3",
        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
}

# Multi-head attention (KV heads = query heads, heads·head_dim = hidden) for the K-only cache:
# YaRN RoPE (attention_scaling ≠ 1) and Qwen2's q/k/v biases.
SLIM_MODELS = {
    "llama-mha-yarn": (
        "llama",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512
            ),
        ),
    ),
    "qwen2-mha": (
        "qwen2",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
}


def save_tiny_model(directory: Path, name: str, seed: int = 0) -> Path:
    import torch
    import transformers

    model_type, extra = {**TINY_MODELS, **SLIM_MODELS}[name]
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    config = config_class(**{**TINY_COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":
        # Random init leaves biases at zero; give them values so they are really tested.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    if model_type == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    path = directory / name
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: save_tiny_model(root, name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def slim_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slim_models")
    return {name: save_tiny_model(root, name) for name in SLIM_MODELS}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module: the whole suite in one process
    otherwise accumulates thousands of executables (XLA:CPU aborted once, late in the suite)."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture()
def compiles() -> list[str]:
    """XLA backend compilations that happen while the test runs, in order."""
    import jax

    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def load_gguf_reference(path: Path) -> tuple[Any, Any]:
    """transformers' tokenizer and float32 model (eval mode) read from the GGUF file `path`.

    transformers parses the file's metadata for the tokenizer, the configuration and the
    weights in turn, about 15 s a parse with Qwen's 151,646-token vocabulary; one reader of
    the same unchanged file serves all three."""
    import gguf
    import torch
    import transformers

    readers: dict[tuple[str, str], Any] = {}
    parse = gguf.GGUFReader

    def reader(file, mode="r"):
        key = (str(file), mode)
        if key not in readers:
            readers[key] = parse(file, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    return tokenizer, model


@pytest.fixture
def kernels_on_cpu(monkeypatch) -> list[tuple[str, tuple[int, ...]]]:
    """The model takes the length-aware kernels' path (interpreted) as on a GPU; records each
    traced kernel call as (kernel, cache buffer shape)."""
    import jax

    from triattention_jax.kernels import decode_attention, key_only_attention

    calls = []

    def counted(module, name):
        kernel = getattr(module, name)

        def call(*args, **kwargs):
            calls.append((name, args[1].shape))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    monkeypatch.setattr(decode_attention, "supported", lambda: True)
    counted(decode_attention, "decode_attention")
    counted(key_only_attention, "key_only_attention")
    jax.clear_caches()  # jitted rounds traced without the kernels must not be reused
    yield calls
    jax.clear_caches()
