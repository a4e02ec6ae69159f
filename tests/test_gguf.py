"""A user's own GGUF file (`--model file.gguf`): tiny random Llama and Qwen2 checkpoints written
as llama.cpp would (q/k rows permuted for Llama, biases for Qwen2, quantized FFN weights), then
converted by us and compared with transformers loading the same file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from triattention_jax.checkpoints import gguf
from triattention_jax.checkpoints.store import load_model
from triattention_jax.decoding import generate, teacher_force
from triattention_jax.errors import UserError

_TOKENIZER_KEYS = ("tokens", "token_type", "merges")


@pytest.fixture(scope="module")
def smollm2_tokenizer_fields():
    reader = GGUFReader(gguf.gguf_path())
    return {key: reader.fields[f"tokenizer.ggml.{key}"].contents() for key in _TOKENIZER_KEYS}


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama: each head's pairs (j, j + hd/2) interleaved."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(path: Path, arch: str, hf: torch.nn.Module, tokenizer_fields: dict) -> Path:
    config = hf.config
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokenizer_fields["tokens"])
    writer.add_token_types(tokenizer_fields["token_type"])
    writer.add_token_merges(tokenizer_fields["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in hf.state_dict().items()}
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if "lm_head.weight" in state and not config.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"].astype(np.float16))
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in range(config.num_hidden_layers):
        for hf_name, ours in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{layer}.{hf_name}.{kind}"
                if key not in state:
                    continue
                value = state[key]
                projection = hf_name.split(".")[-1]
                if arch == "llama" and projection in heads:
                    value = _llama_cpp_permute(value, heads[projection])
                name = f"blk.{layer}.{ours}.{kind}"
                if ours.startswith("ffn_") and kind == "weight":
                    writer.add_tensor(
                        name, quantize(value, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
                    )
                else:
                    writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory, smollm2_tokenizer_fields):
    arch = request.param
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        arch, **TINY, tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0)
    )
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if arch == "qwen2":
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp(f"gguf-{arch}")
    return arch, _write_gguf(folder / f"Tiny-{arch.upper()}.gguf", arch, hf, smollm2_tokenizer_fields)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIATTENTION_MODELS", str(tmp_path / "store"))
    return tmp_path / "store"


def test_a_users_gguf_file_matches_transformers_reading_it(tiny_gguf, store):
    arch, path = tiny_gguf
    ours = load_model(str(path), dtype="float32")
    assert ours.path == store / path.stem.lower() and ours.config.model_type == arch
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokens = np.random.default_rng(1).integers(3, 49152, size=(1, 96))
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor(tokens)).logits, -1).numpy()
    got = teacher_force(ours, tokens, prefill_length=32, divide_length=32)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        greedy = reference.generate(torch.tensor(tokens[:, :20]), max_new_tokens=24, do_sample=False)[0, 20:].tolist()
    assert generate(ours, tokens[:, :20].tolist(), eos_ids=(), max_new_tokens=24).token_ids[0] == greedy


def test_a_users_gguf_file_is_reconverted_only_when_it_changes(tiny_gguf, store, tmp_path):
    _, source = tiny_gguf
    path = tmp_path / source.name
    shutil.copy(source, path)
    first = load_model(str(path), dtype="float32").path
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert load_model(str(path), dtype="float32").path == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    path.touch()
    load_model(str(path), dtype="float32")
    assert (first / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((first / gguf.SOURCE_RECORD).read_text())["path"] == str(path.resolve())


def test_unsupported_gguf_architecture_is_refused_in_one_line(tmp_path, store, smollm2_tokenizer_fields):
    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), arch="gemma")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="GGUF architecture 'gemma' is not supported") as error:
        load_model(str(path))
    assert "\n" not in str(error.value)
    assert not list(store.glob("*")) or not any(p.name.startswith(".") for p in store.iterdir())


def test_a_damaged_gguf_file_is_refused_in_one_line(tmp_path, store):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf.gguf_path().read_bytes()[:100_000])
    with pytest.raises(UserError, match="cannot read .*cut.gguf as a GGUF file"):
        load_model(str(path))
