"""Loading: bf16 and sharded safetensors, the hub cache, refusals, GGUF row order."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_COMMON

from triattention_jax.checkpoints.gguf import unpermute_rope_rows
from triattention_jax.checkpoints.hf import convert_hf_weights, load_transformer, read_hf_config, read_hf_tensors
from triattention_jax.checkpoints.safetensors_io import read_safetensors, write_safetensors
from triattention_jax.checkpoints.store import resolve_model_dir
from triattention_jax.config import ModelConfig
from triattention_jax.errors import UserError


def test_bf16_and_sharded_safetensors_read_without_torch(tmp_path, tiny_model_dirs):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen2-untied"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="100KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    tensors = read_hf_tensors(tmp_path / "bf16")
    state = model.state_dict()
    assert set(tensors) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name].astype(np.float32), value.float().numpy())
    assert load_transformer(tmp_path / "bf16", dtype="bfloat16").layers[0].wq[...].dtype == np.dtype("bfloat16")


def test_other_safetensors_files_beside_the_weights_are_ignored(tmp_path, tiny_model_dirs):
    folder = tmp_path / "with_stats"
    shutil.copytree(tiny_model_dirs["llama-tied"], folder)
    write_safetensors(folder / "triattention_stats.safetensors", {"q_mean_real": np.zeros((3, 4, 8), np.float32)})
    assert set(read_hf_tensors(folder)) == set(read_hf_tensors(tiny_model_dirs["llama-tied"]))


def test_safetensors_round_trip(tmp_path):
    import ml_dtypes

    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones(5, ml_dtypes.bfloat16),
        "c": np.arange(3),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    assert not list(tmp_path.glob("*.tmp"))


def test_hub_id_resolves_through_the_offline_cache(tmp_path, tiny_model_dirs, monkeypatch):
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dirs["llama-tied"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("tiny-org/tiny-llama").resolve() == snapshot.resolve()
    with pytest.raises(UserError, match="cannot get 'tiny-org/absent'"):
        resolve_model_dir("tiny-org/absent")


def _hf_config(**overrides):
    config = {"model_type": "llama", **TINY_COMMON, **overrides}
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_type": "mistral"}, "unsupported model_type 'mistral'"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window attention"),
        ({"num_local_experts": 8}, "mixture-of-experts"),
        ({"partial_rotary_factor": 0.5}, "partial rotary"),
        ({"no_rope_layers": [1, 0, 1]}, "without RoPE"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "unsupported RoPE scaling 'longrope'"),
    ],
)
def test_unsupported_features_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.from_hf(_hf_config(**overrides))


def test_shape_mismatch_is_refused(tmp_path, tiny_model_dirs):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama-tied"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), which does not fit the config"):
        load_transformer(broken, dtype="float32")


def test_missing_layer_weights_are_refused(tiny_model_dirs):
    config, _ = read_hf_config(tiny_model_dirs["llama-tied"])
    tensors = dict(read_hf_tensors(tiny_model_dirs["llama-tied"]))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"lacks w_up for layers \[1\]"):
        convert_hf_weights(config, tensors)


def test_gguf_rows_return_to_split_half_order():
    heads, head_dim, width = 3, 8, 5
    hf = np.random.default_rng(0).normal(size=(heads * head_dim, width))
    # llama.cpp's converter interleaves each head's two halves row by row.
    gguf = hf.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(gguf, heads), hf)
