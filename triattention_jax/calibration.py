"""Offline calibration: streaming pre-RoPE query (and key) moments per (layer, head, band).

Queries are taken after everything that precedes the rotation (Qwen2 bias, Qwen3 q_norm),
because `Transformer.extend(collect_pre_rope=True)` returns them from the same code path
that decoding runs. Padding never enters the sums.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from triattention_jax.checkpoints.stats import (
    FIT_FILE,
    STATS_FILE,
    CalibrationResult,
    FitResult,
    check_compatible,
    load_fit,
    load_stats,
    model_metadata,
    save_stats,
)
from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.decoding import generate, prompt_bucket
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer
from triattention_jax.prompts import encode_prompts
from triattention_jax.sampling import Sampler
from triattention_jax.scoring import FrequencyStats

# Varied prompts (reasoning, code, chat) for self-generated calibration text.
SELF_CALIBRATION_PROMPTS = (
    "Solve step by step: a train travels 240 km in 3 hours, then 180 km in 2 hours. What is its average speed?",
    "Prove that the sum of the first n odd numbers is n squared. Explain each step.",
    "A farmer has chickens and cows, 30 heads and 74 legs in total. How many of each? Reason carefully.",
    "Write a Python function that returns the n-th Fibonacci number using memoization, with comments.",
    "Implement binary search in Python and explain its time complexity.",
    "Write a JavaScript function that debounces another function, then show an example of using it.",
    "Explain how a hash table works, including collisions and resizing.",
    "Tell me about the history of the printing press and why it mattered.",
    "I am planning a week-long trip to Japan. What should I see, eat and pack?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of climate change, and what can individuals do about it?",
    "Give me advice on preparing for a job interview as a software engineer.",
)


@dataclasses.dataclass
class QueryMoments:
    """Running float64 sums over valid tokens, per (layer, head, band) and per (layer, head)."""

    q_sum: np.ndarray  # complex (L, H, F)
    q_abs_sum: np.ndarray  # (L, H, F)
    q_power_sum: np.ndarray  # (L, H, F): Σ |q_f|²
    q_norm_sum: np.ndarray  # (L, H): Σ ‖q‖ over the full head vector
    k_sum: np.ndarray  # complex (L, K, F)
    count: int = 0

    @classmethod
    def zeros(cls, transformer: Transformer) -> QueryMoments:
        c = transformer.config
        half = c.head_dim // 2
        return cls(
            q_sum=np.zeros((c.num_layers, c.num_heads, half), np.complex128),
            q_abs_sum=np.zeros((c.num_layers, c.num_heads, half)),
            q_power_sum=np.zeros((c.num_layers, c.num_heads, half)),
            q_norm_sum=np.zeros((c.num_layers, c.num_heads)),
            k_sum=np.zeros((c.num_layers, c.num_kv_heads, half), np.complex128),
        )

    def add(self, sums: dict[str, jax.Array]) -> None:
        host = {name: np.asarray(value, np.float64) for name, value in sums.items()}
        self.q_sum += host["q_re"] + 1j * host["q_im"]
        self.q_abs_sum += host["q_abs"]
        self.q_power_sum += host["q_power"]
        self.q_norm_sum += host["q_norm"]
        self.k_sum += host["k_re"] + 1j * host["k_im"]
        self.count += int(host["count"])

    def stats(self) -> FrequencyStats:
        if self.count == 0:
            raise UserError("no calibration tokens were seen: give a non-empty --calib_file or a positive --num_tokens")
        mean = self.q_sum / self.count
        return FrequencyStats(
            q_mean_real=mean.real.astype(np.float32),
            q_mean_imag=mean.imag.astype(np.float32),
            q_abs_mean=(self.q_abs_sum / self.count).astype(np.float32),
        )

    def band_variance(self) -> np.ndarray:
        """E|q_f − E q_f|² per (layer, head, band), float32: the query spread within each band."""
        mean = self.q_sum / max(self.count, 1)
        return np.maximum(self.q_power_sum / max(self.count, 1) - np.abs(mean) ** 2, 0.0).astype(np.float32)

    def key_means(self) -> np.ndarray:
        """Complex mean pre-RoPE key per (layer, KV head, band)."""
        return self.k_sum / max(self.count, 1)

    def resultant_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(R per (layer, head), R_f per (layer, head, band)), the concentration diagnostics."""
        mean = self.q_sum / self.count
        r_head = np.sqrt((np.abs(mean) ** 2).sum(-1)) / (self.q_norm_sum / self.count)
        r_band = np.abs(mean) / np.maximum(self.q_abs_sum / self.count, 1e-12)
        return r_head, r_band


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _batch_sums(graphdef, state, tokens: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
    transformer = nnx.merge(graphdef, state)
    index = jnp.arange(tokens.shape[1])[None]
    positions = jnp.where(index < lengths[:, None], index, -1)
    out = transformer.extend(None, tokens, positions, logits_at=jnp.zeros_like(lengths), collect_pre_rope=True)
    valid = (positions >= 0)[None, :, :, None, None].astype(jnp.float32)
    half = out.queries.shape[-1] // 2
    q, k = out.queries * valid, out.keys * valid
    q_re, q_im = q[..., :half], q[..., half:]
    return {
        "q_re": q_re.sum((1, 2)),
        "q_im": q_im.sum((1, 2)),
        "q_abs": jnp.sqrt(q_re**2 + q_im**2).sum((1, 2)),
        "q_power": (q_re**2 + q_im**2).sum((1, 2)),
        "q_norm": jnp.sqrt((q**2).sum(-1)).sum((1, 2)),
        "k_re": k[..., :half].sum((1, 2)),
        "k_im": k[..., half:].sum((1, 2)),
        "count": jnp.sum(positions >= 0),
    }


def accumulate(
    transformer: Transformer, sequences: Iterable[Sequence[int]], *, batch_size: int = 8, progress: bool = True
) -> QueryMoments:
    """Moments over token sequences, batched and right-padded to a bucketed length."""
    from tqdm import tqdm

    graphdef, state = nnx.split(transformer)
    moments = QueryMoments.zeros(transformer)
    sequences = [list(s) for s in sequences if len(s)]
    limit = transformer.config.max_position_embeddings
    with tqdm(
        total=sum(len(s) for s in sequences), desc="calibrating", unit="tok", disable=not progress, file=sys.stderr
    ) as bar:
        for begin in range(0, len(sequences), batch_size):
            chunk = sequences[begin : begin + batch_size]
            width = min(prompt_bucket(max(len(s) for s in chunk)), limit)
            tokens = np.zeros((len(chunk), width), np.int32)
            for row, seq in enumerate(chunk):
                tokens[row, : len(seq)] = seq[:width]
            lengths = np.array([min(len(s), width) for s in chunk], np.int32)
            moments.add(_batch_sums(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths)))
            bar.update(int(lengths.sum()))
    return moments


def text_file_sequences(model: LoadedModel, paths: Sequence[str], num_tokens: int, seq_len: int) -> list[list[int]]:
    """Token sequences of `seq_len` from text files, `num_tokens` in all (files in order)."""
    sequences: list[list[int]] = []
    remaining = num_tokens
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as e:
            raise UserError(f"cannot read --calib_file {path}: {e}") from e
        ids = model.tokenizer(text)["input_ids"][:remaining]
        sequences.extend(ids[i : i + seq_len] for i in range(0, len(ids), seq_len))
        remaining -= len(ids)
        if remaining <= 0:
            break
    if not sequences:
        raise UserError(f"--calib_file {', '.join(paths)} holds no text to calibrate on")
    return sequences


def self_generated_sequences(
    model: LoadedModel, num_tokens: int, *, seed: int = 0, progress: bool = True
) -> Iterator[list[int]]:
    """The model's own sampled answers to SELF_CALIBRATION_PROMPTS, prompt included, about `num_tokens` in all."""
    from tqdm import tqdm

    chat = bool(getattr(model.tokenizer, "chat_template", None))
    prompts = encode_prompts(model.tokenizer, SELF_CALIBRATION_PROMPTS, chat=chat)
    prompt_total = sum(len(p) for p in prompts)
    per_prompt = max(1, -(-(num_tokens - prompt_total) // len(prompts)))
    per_prompt = min(per_prompt, model.config.max_position_embeddings - max(len(p) for p in prompts))
    bar = tqdm(total=per_prompt, desc="generating calibration text", unit="step", disable=not progress, file=sys.stderr)

    def on_round(generated: list[list[int]]) -> None:
        bar.update(max(len(g) for g in generated) - bar.n)

    result = generate(
        model.transformer,
        prompts,
        eos_ids=(),
        max_new_tokens=per_prompt,
        sampler=Sampler(temperature=0.7, top_p=0.95),
        seed=seed,
        on_round=on_round,
    )
    bar.close()
    for prompt, answer in zip(prompts, result.token_ids):
        yield prompt + answer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """What `calibrate` measured: `result`, the statistics with their metadata (what
    `save_stats` writes); `moments`, the raw sums (concentration diagnostics); `sequences`,
    the token sequences they were computed on."""

    result: CalibrationResult
    moments: QueryMoments
    sequences: list[list[int]]

    @property
    def stats(self) -> FrequencyStats:
        return self.result.stats


def calibrate(
    model: LoadedModel,
    *,
    calib_files: Sequence[str] = (),
    num_tokens: int = 16384,
    seq_len: int = 1024,
    batch_size: int = 8,
    progress: bool = True,
) -> Calibration:
    """Statistics from text files, or from the model's own generations when there are none."""
    if num_tokens < 1:
        raise UserError(f"--num_tokens must be positive, got {num_tokens}")
    if calib_files:
        sequences = text_file_sequences(model, calib_files, num_tokens, seq_len)
        source = "files: " + ", ".join(Path(p).name for p in calib_files)
    else:
        sequences = list(self_generated_sequences(model, num_tokens, progress=progress))
        source = f"self-generated ({len(SELF_CALIBRATION_PROMPTS)} prompts, temperature 0.7, top_p 0.95)"
    moments = accumulate(model.transformer, sequences, batch_size=batch_size, progress=progress)
    metadata = {**model_metadata(model.transformer), "num_tokens": moments.count, "source": source, "model": model.name}
    result = CalibrationResult(stats=moments.stats(), metadata=metadata, q_band_var=moments.band_variance())
    return Calibration(result=result, moments=moments, sequences=sequences)


# Statistics that ship with the package, by model store name.
BUNDLED_STATS_DIR = Path(__file__).resolve().parent / "data"


def bundled_stats_path(name: str, file: str = STATS_FILE) -> Path | None:
    """The packaged statistics (or fitted scorer: `file`) of the model store entry `name`, if any."""
    path = BUNDLED_STATS_DIR / f"{name}.{file}"
    return path if path.exists() else None


def fit_for_model(model: LoadedModel, features: tuple[str, ...], path: str | None = None) -> FitResult:
    """The fitted scorer for a model: from `path`, else the model folder's, else the package's.
    Fitting takes minutes, so it is never started implicitly."""
    default = model.store_dir / FIT_FILE
    bundled = bundled_stats_path(model.name, FIT_FILE)
    found = path or (default if default.exists() else bundled)
    if found is None:
        raise UserError(
            f"no fitted scorer for {model.name}: run python calibrate.py --model {model.name} --fit "
            "(or pass --fitted_scorer FILE)"
        )
    return load_fit(found, model.transformer, features)


def stats_for_model(model: LoadedModel, path: str | None = None) -> CalibrationResult:
    """TriAttention statistics for a model: from `path`, else those that came with the
    checkpoint (orbax), else the model folder's, else the package's, else calibrated (and
    saved in the model folder) on first use."""
    if path is not None:
        return load_stats(path, model.transformer)
    if model.stats is not None:
        check_compatible(model.stats.metadata, model.transformer, model.path)
        return model.stats
    default = model.store_dir / STATS_FILE
    bundled = bundled_stats_path(model.name)
    if not default.exists() and bundled is not None:
        return load_stats(bundled, model.transformer)
    if not default.exists():
        print(f"no TriAttention statistics for {model.name} yet: calibrating once into {default}", file=sys.stderr)
        default.parent.mkdir(parents=True, exist_ok=True)
        save_stats(default, calibrate(model).result)
    return load_stats(default, model.transformer)
