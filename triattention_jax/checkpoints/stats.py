"""Calibration statistics on disk: our safetensors format with metadata, and the reference
implementation's torch `.pt` format. Loading checks the metadata against the model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from triattention_jax.checkpoints.safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer
from triattention_jax.scoring import FrequencyStats

STATS_FILE = "triattention_stats.safetensors"
# The fitted scorer's weights, beside the statistics (`calibrate.py --fit`).
FIT_FILE = "triattention_fit.safetensors"
FORMAT_VERSION = 1
STAT_NAMES = ("q_mean_real", "q_mean_imag", "q_abs_mean")
# Every FINGERPRINT_STRIDE-th element of the q/k weights, rounded to bfloat16, identifies a
# checkpoint whichever dtype it was loaded in, at a small fraction of the hashing cost.
FINGERPRINT_STRIDE = 61
_REFERENCE_KEY = re.compile(r"layer(\d+)_head(\d+)")


def model_fingerprint(transformer: Transformer) -> str:
    digest = hashlib.sha256()
    for name in ("wq", "wk", "bq", "bk", "q_norm", "k_norm"):
        if hasattr(transformer.layers[0], name):
            values = np.asarray(transformer.stacked(name)).reshape(-1)[::FINGERPRINT_STRIDE]
            digest.update(name.encode())
            digest.update(values.astype(ml_dtypes.bfloat16).tobytes())
    return digest.hexdigest()[:16]


def model_metadata(transformer: Transformer) -> dict[str, Any]:
    """What a statistics file must agree with to be used on this model."""
    config = transformer.config
    return {
        "architecture": config.model_type,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope": dataclasses.asdict(config.rope),
        "fingerprint": model_fingerprint(transformer),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    """Statistics plus where they came from: num_tokens counted and a description of the source.

    q_band_var: the query variance per band E|q_f − E q_f|², (layers, heads, head_dim/2), which
    `expected_attention_calibrated` needs; None where the source lacks it (the reference `.pt`
    format, files written before it was recorded).
    """

    stats: FrequencyStats
    metadata: dict[str, Any]
    q_band_var: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.metadata.get("num_tokens", 0))


def check_compatible(metadata: dict[str, Any], transformer: Transformer, source: str | os.PathLike) -> None:
    """Refuses statistics computed on another model, naming the first field that differs."""
    expected = model_metadata(transformer)
    for key, value in expected.items():
        if key not in metadata:
            continue
        if json.loads(json.dumps(metadata[key])) != json.loads(json.dumps(value)):
            raise UserError(
                f"statistics {source} were computed for another model ({key}: {metadata[key]} != {value}): "
                "run calibrate.py for this model or pass the right --stats"
            )


def save_stats(path: str | os.PathLike, result: CalibrationResult) -> None:
    """Writes our format (safetensors + JSON metadata) or, for a `.pt` path, the reference format
    (which has no place for the band variance: it is left out)."""
    path = Path(path)
    if path.suffix == ".pt":
        _save_reference_pt(path, result)
        return
    arrays = {name: np.asarray(getattr(result.stats, name), np.float32) for name in STAT_NAMES}
    if result.q_band_var is not None:
        arrays["q_band_var"] = np.asarray(result.q_band_var, np.float32)
    write_safetensors(
        path, arrays, metadata={"triattention": json.dumps({**result.metadata, "format_version": FORMAT_VERSION})}
    )


def load_stats(path: str | os.PathLike, transformer: Transformer) -> CalibrationResult:
    """Reads either format and checks it against the model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"statistics file {path} does not exist: run calibrate.py --out {path}")
    if path.suffix == ".pt":
        result = _load_reference_pt(path, transformer)
    else:
        result = _load_safetensors_stats(path)
    check_compatible(result.metadata, transformer, path)
    expected = (transformer.config.num_layers, transformer.config.num_heads, transformer.config.head_dim // 2)
    arrays = {name: getattr(result.stats, name) for name in STAT_NAMES}
    if result.q_band_var is not None:
        arrays["q_band_var"] = result.q_band_var
    for name, values in arrays.items():
        shape = tuple(np.shape(values))
        if shape != expected:
            raise UserError(f"statistics {path} have {name} of shape {shape}, the model needs {expected}: recalibrate")
    return result


def _metadata_dict(raw: Any, path: Path) -> dict[str, Any]:
    """Statistics metadata: a JSON object (given as text or already decoded)."""
    try:
        metadata = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except json.JSONDecodeError as e:
        raise UserError(f"statistics {path} have metadata that is not valid JSON ({e.msg}): recalibrate") from e
    if not isinstance(metadata, dict):
        raise UserError(f"statistics {path} have metadata that is not a JSON object: recalibrate")
    return metadata


def _load_safetensors_stats(path: Path) -> CalibrationResult:
    tensors = read_safetensors(path)
    raw = read_safetensors_metadata(path).get("triattention")
    if raw is None or not set(STAT_NAMES) <= tensors.keys():
        raise UserError(f"{path} is not a TriAttention statistics file: run calibrate.py to create one")
    stats = FrequencyStats(**{name: np.array(tensors[name], np.float32) for name in STAT_NAMES})
    band_var = np.array(tensors["q_band_var"], np.float32) if "q_band_var" in tensors else None
    return CalibrationResult(stats=stats, metadata=_metadata_dict(raw, path), q_band_var=band_var)


def _save_reference_pt(path: Path, result: CalibrationResult) -> None:
    torch = _torch()
    layers, heads, _ = np.shape(result.stats.q_mean_real)
    stats = {}
    for layer in range(layers):
        for head in range(heads):
            stats[f"layer{layer:02d}_head{head:02d}"] = {
                name: torch.from_numpy(np.asarray(getattr(result.stats, name)[layer, head], np.float32).copy())
                for name in STAT_NAMES
            }
    metadata = {
        "rope_style": "half",
        "head_dim": int(result.metadata["head_dim"]),
        "sampled_heads": [[layer, head] for layer in range(layers) for head in range(heads)],
        "triattention_jax": json.dumps(result.metadata),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"metadata": metadata, "stats": stats}, tmp)
    os.replace(tmp, path)


def _load_reference_pt(path: Path, transformer: Transformer) -> CalibrationResult:
    torch = _torch()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False, which would run the file's code: never.
        reason = "it holds objects other than tensors and plain data" if "weights_only" in str(e) else type(e).__name__
        raise UserError(
            f"cannot read reference statistics {path} ({reason}): recalibrate or pass another --stats"
        ) from e
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("metadata"), dict)
        or not isinstance(payload.get("stats"), dict)
    ):
        raise UserError(f"{path} is not a reference statistics file (a dict with 'metadata' and 'stats' dicts)")
    meta, entries = payload["metadata"], payload["stats"]
    config = transformer.config
    if meta.get("rope_style", "half") != "half":
        raise UserError(f"{path} uses rope_style {meta['rope_style']!r}; only the split-half (HF) layout is supported")
    if meta.get("head_dim", config.head_dim) != config.head_dim:
        raise UserError(
            f"statistics {path} were computed for another model (head_dim: {meta['head_dim']} != {config.head_dim})"
        )
    half = config.head_dim // 2
    arrays = {name: np.zeros((config.num_layers, config.num_heads, half), np.float32) for name in STAT_NAMES}
    seen = np.zeros((config.num_layers, config.num_heads), bool)
    for key, values in entries.items():
        match = _REFERENCE_KEY.fullmatch(str(key))
        if match is None:
            raise UserError(f"statistics {path} have an entry {key!r}; expected names like layer00_head00")
        layer, head = int(match.group(1)), int(match.group(2))
        if layer >= config.num_layers or head >= config.num_heads:
            raise UserError(f"statistics {path} name {key}, which this model does not have")
        if not isinstance(values, dict) or not set(STAT_NAMES) <= values.keys():
            raise UserError(f"statistics {path} entry {key} lacks one of {', '.join(STAT_NAMES)}")
        for name in STAT_NAMES:
            value = np.asarray(values[name], np.float32)
            if value.shape != (half,):
                raise UserError(
                    f"statistics {path} entry {key}/{name} has shape {value.shape}, this model needs ({half},)"
                )
            arrays[name][layer, head] = value
        seen[layer, head] = True
    if not seen.all():
        missing = np.argwhere(~seen)[:4].tolist()
        raise UserError(
            f"statistics {path} lack {int((~seen).sum())} (layer, head) entries, e.g. {missing}: recalibrate"
        )
    metadata = (
        _metadata_dict(meta["triattention_jax"], path)
        if "triattention_jax" in meta
        else {"head_dim": config.head_dim, "source": str(path)}
    )
    return CalibrationResult(stats=FrequencyStats(**arrays), metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitResult:
    """A fitted scorer (`policies.triattention_fit`): weights (layers, heads, features) for the
    features named in metadata["features"], the query variance per band q_band_var (layers,
    heads, head_dim/2), and metadata (the model's, the target, the fitting texts' fingerprints)."""

    weights: np.ndarray
    q_band_var: np.ndarray
    metadata: dict[str, Any]


def save_fit(path: str | os.PathLike, result: FitResult) -> None:
    write_safetensors(
        Path(path),
        {"weights": np.asarray(result.weights, np.float32), "q_band_var": np.asarray(result.q_band_var, np.float32)},
        metadata={"triattention_fit": json.dumps({**result.metadata, "format_version": FORMAT_VERSION})},
    )


def load_fit(path: str | os.PathLike, transformer: Transformer, features: tuple[str, ...]) -> FitResult:
    """Reads a fitted scorer and checks it against the model and the scorer's `features`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"fitted scorer {path} does not exist: run calibrate.py --fit")
    tensors = read_safetensors(path)
    raw = read_safetensors_metadata(path).get("triattention_fit")
    if raw is None or not {"weights", "q_band_var"} <= tensors.keys():
        raise UserError(f"{path} is not a fitted TriAttention scorer: run calibrate.py --fit to create one")
    metadata = _metadata_dict(raw, path)
    check_compatible(metadata, transformer, path)
    if tuple(metadata.get("features", ())) != tuple(features):
        raise UserError(
            f"fitted scorer {path} has features {metadata.get('features')}, this version uses {list(features)}: "
            "run calibrate.py --fit again"
        )
    config = transformer.config
    shapes = {
        "weights": (config.num_layers, config.num_heads, len(features)),
        "q_band_var": (config.num_layers, config.num_heads, config.head_dim // 2),
    }
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(
                f"fitted scorer {path} has {name} of shape {tuple(tensors[name].shape)}, the model needs {shape}"
            )
    return FitResult(
        weights=np.array(tensors["weights"], np.float32),
        q_band_var=np.array(tensors["q_band_var"], np.float32),
        metadata=metadata,
    )


def _torch():
    try:
        import torch
    except ImportError as e:
        raise UserError("reading or writing .pt statistics needs torch: pip install 'triattention-jax[torch]'") from e
    return torch
