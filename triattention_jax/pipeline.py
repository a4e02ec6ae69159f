"""What the command lines do, as library functions: decode prompts and report, calibrate and
report."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from triattention_jax import sharding
from triattention_jax.calibration import calibrate, text_file_sequences
from triattention_jax.checkpoints.stats import FIT_FILE, STATS_FILE, save_fit, save_stats
from triattention_jax.checkpoints.store import load_model
from triattention_jax.config import ModelConfig
from triattention_jax.decoding import free_device_memory, generate, prompt_bucket
from triattention_jax.errors import UserError
from triattention_jax.eval.texts import fit_documents
from triattention_jax.files import check_writable, write_json_atomic
from triattention_jax.fitting import STARTS, TARGETS, choose_scorer, fit_scorer, selection_length
from triattention_jax.methods import PolicySettings, build_policy
from triattention_jax.policies import EvictionPolicy, FullAttention
from triattention_jax.prompts import encode_prompts, has_chat_template, read_prompt_file
from triattention_jax.sampling import Sampler
from triattention_jax.slim import KV_CACHE_MODES, logprob_error, slim_transformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeRequest:
    """What `decode.py` asks for, field by field as its flags name it (their defaults live there).

    mesh: a spec such as "data=2,model=4" (see `sharding.make_mesh`) to decode on a device
    mesh; a multi-host launch (see `sharding.initialize_distributed`) needs one.
    """

    model: str
    prompt: str | None
    prompt_file: str | None
    chat: bool | None
    max_new_tokens: int
    ignore_eos: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    dtype: str
    method: str
    divide_length: int
    kv_cache: str
    slim_max_cond: float | None
    slim_value_map: str
    mesh: str | None
    output_json: str | None


def decode_prompts(
    request: DecodeRequest,
    settings: PolicySettings = PolicySettings(),
    *,
    on_text: Callable[[list[str]], None] | None = None,
) -> dict[str, Any]:
    """Generates for one prompt or a file of prompts with the policy `settings` describe;
    returns (and optionally writes) the report; `on_text` receives, after each decoded piece, a
    single prompt's text so far (a batch: an empty list, its texts come whole in the report)."""
    if (request.prompt is None) == (request.prompt_file is None):
        raise UserError("give exactly one of --prompt or --prompt_file")
    texts = [request.prompt] if request.prompt is not None else read_prompt_file(request.prompt_file)
    if request.output_json:
        check_writable(request.output_json)
    sampler = Sampler(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
    if request.kv_cache not in KV_CACHE_MODES:
        raise UserError(f"unknown --kv_cache {request.kv_cache!r}: choose one of {', '.join(KV_CACHE_MODES)}")
    device_mesh, mesh_for = None, None
    if request.mesh is not None:
        sharding.initialize_distributed()
    if request.mesh == "auto":

        def mesh_for(config: ModelConfig, tokenizer: Any) -> Mesh | None:
            """Sized for the longest prompt with full attention's buffer, which no policy exceeds."""
            chat = has_chat_template(tokenizer) if request.chat is None else request.chat
            longest = max(map(len, encode_prompts(tokenizer, texts, chat=chat)))
            sizes = sharding.choose_mesh(
                config,
                request.dtype,
                devices=jax.device_count(),
                batches=[len(texts)],
                num_slots=FullAttention().num_slots(
                    prompt_bucket(longest), request.max_new_tokens, request.divide_length
                ),
                memory_bytes=free_device_memory(),
            )
            # One device decodes best without a mesh: the decode kernels stay on.
            mesh = sharding.make_mesh(sizes) if sizes["data"] * sizes["model"] > 1 else None
            print(f"--mesh auto: {sharding.format_mesh(sizes)}{'' if mesh else ' (no mesh)'}", file=sys.stderr)
            return mesh

    elif request.mesh is not None:
        device_mesh = sharding.make_mesh(request.mesh)
        sharding.check_batch(len(texts), device_mesh)
    loaded = load_model(request.model, dtype=request.dtype, mesh=device_mesh, mesh_for=mesh_for)
    device_mesh = loaded.mesh
    tokenizer = loaded.tokenizer
    use_chat = has_chat_template(tokenizer) if request.chat is None else request.chat
    prompt_ids = encode_prompts(tokenizer, texts, chat=use_chat)
    transformer, slim_report = loaded.transformer, None
    if request.kv_cache == "slim":
        transformer, slim_report = slim_transformer(
            transformer,
            max_cond=request.slim_max_cond,
            value_map=request.slim_value_map,
            probe_tokens=np.asarray([prompt_ids[0]]),
        )
    policy = build_policy(loaded, request.method, settings)
    if isinstance(policy, EvictionPolicy) and not _evicts(
        policy, prompt_ids, request.max_new_tokens, request.divide_length
    ):
        print(
            f"note: --method {request.method} keeps {settings.budget} tokens per KV head, more than this run ever "
            f"caches (the longest prompt plus --max_new_tokens={request.max_new_tokens}): nothing will be evicted; "
            "lower --budget to see eviction",
            file=sys.stderr,
        )

    def stream(token_ids: list[list[int]]) -> None:
        if on_text is not None:
            # Only one prompt streams: decoding every row after every piece would be wasted work.
            on_text([tokenizer.decode(token_ids[0], skip_special_tokens=True)] if len(token_ids) == 1 else [])

    result = generate(
        dataclasses.replace(loaded, transformer=transformer),
        prompt_ids,
        max_new_tokens=request.max_new_tokens,
        eos_ids=() if request.ignore_eos else loaded.config.eos_token_ids,
        sampler=sampler,
        policy=policy,
        divide_length=request.divide_length,
        seed=request.seed,
        on_round=stream,
        mesh=device_mesh,
    )
    generated = sum(result.num_generated_tokens)
    if slim_report is not None:
        slim_report = slim_report.to_dict() | {
            "logprob_error": _slim_error(
                loaded.transformer, transformer, prompt_ids[0], result.token_ids[0], request.divide_length
            )
        }
    payload = {
        "model": str(loaded.path),
        "method": request.method,
        "dtype": request.dtype,
        "kv_cache": request.kv_cache,
        "mesh": None if device_mesh is None else sharding.format_mesh(device_mesh),
        "slim": slim_report,
        "policy_settings": dataclasses.asdict(settings) if request.method != "full" else None,
        "policy": {"name": type(policy).__name__, **policy.settings()},
        "divide_length": request.divide_length,
        "chat": use_chat,
        "prompts": texts,
        "generated_token_ids": result.token_ids,
        "texts": result.texts,
        "num_prompt_tokens": result.num_prompt_tokens,
        "num_generated_tokens": result.num_generated_tokens,
        "kv_cache_bytes": result.kv_cache_bytes,
        "kv_payload_bytes": result.kv_payload_bytes,
        "wall_seconds": result.wall_seconds,
        "tokens_per_second": generated / result.wall_seconds,
    }
    if request.output_json and jax.process_index() == 0:
        write_json_atomic(request.output_json, payload)
    return payload


def _evicts(policy: EvictionPolicy, prompt_ids: list[list[int]], max_new_tokens: int, divide_length: int) -> bool:
    """Whether any compaction happens: the prefill's or a round's (the schedule `generate` follows)."""
    longest = max(map(len, prompt_ids))
    slots = prompt_bucket(longest)
    return slots > policy.budget or bool(policy.compacting_rounds(longest, slots, max_new_tokens, divide_length))


def _slim_error(standard, slim, prompt: list[int], generated: list[int], divide_length: int) -> dict[str, float] | None:
    """The K-only cache's measured log-prob error against the standard cache (full attention,
    same weights and dtype) over the first row's generated tokens, teacher-forced."""
    if len(generated) < 2:
        return None
    tokens = np.asarray([prompt + generated], np.int32)
    return logprob_error(standard, slim, tokens, prefill_length=len(prompt), divide_length=divide_length)


REPORT_SEQUENCE_TOKENS = 1024


def run_calibration(
    *,
    model: str,
    calib_files: Sequence[str],
    num_tokens: int,
    seq_len: int,
    batch_size: int,
    dtype: str,
    out: str | None,
    report: bool,
    report_dir: str | None,
    fit: bool = False,
    fit_target: str = "output",
    fit_start: str = "prior",
    fit_code_files: int = 4,
    fit_seq_len: int = 4096,
    fit_horizon: int | None = 512,
    fit_budget: int = 512,
    fit_choose: bool = True,
) -> list[str]:
    """Calibrates, writes the statistics (and the report, and with `fit` the fitted scorer,
    beside the statistics); returns summary lines to print.

    The fit reads sequences of `fit_seq_len` tokens, long enough to see the distances decoding
    meets: `calib_files` cut that long, or else the calibration's own generated sequences and
    `fit_code_files` standard-library source files (`eval.texts.fit_documents`: never
    evaluation texts); fit_target, fit_start: `fitting.fit_scorer`'s; fit_horizon: the future
    queries the target counts (None: all to the end of each sequence); fit_budget: the budget
    whose kept set the "kept" target is, and at which `fitting.choose_scorer` (unless not
    `fit_choose`) chooses the blend with Expected Attention's prior, the aggregation and the
    redundancy weight by
    decoding texts of `fit_seq_len` tokens the weights were not fitted on: the next
    `fit_code_files` source files, or the last quarter of the
    `calib_files` sequences."""
    fit_path = None
    if out:
        check_writable(out)
        fit_path = Path(out).with_suffix(".fit.safetensors") if fit else None
    if fit:
        if fit_target not in TARGETS:
            raise UserError(f"unknown --fit_target {fit_target!r}: choose one of {', '.join(TARGETS)}")
        if fit_start not in STARTS:
            raise UserError(f"unknown --fit_start {fit_start!r}: choose one of {', '.join(STARTS)}")
        if fit_choose and fit_seq_len < selection_length(fit_budget):
            raise UserError(
                f"--fit_seq_len {fit_seq_len} is too short to choose the fitted scorer at --fit_budget {fit_budget} "
                f"(it needs {selection_length(fit_budget)}): raise --fit_seq_len, lower --fit_budget, "
                "or pass --nofit_choose"
            )
        if fit_path:
            check_writable(str(fit_path))
    loaded = load_model(model, dtype=dtype)
    calibration = calibrate(
        loaded, calib_files=calib_files, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size
    )
    result, moments, sequences = calibration.result, calibration.moments, calibration.sequences
    target = Path(out) if out else loaded.store_dir / STATS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    save_stats(target, result)
    r_head, _ = moments.resultant_lengths()
    lines = [
        f"statistics: {target} ({result.num_tokens} tokens; {result.metadata['source']})",
        f"heads with R > 0.95: {(r_head > 0.95).mean():.1%}, R > 0.90: {(r_head > 0.90).mean():.1%}",
    ]
    if report:
        from triattention_jax.concentration import concentration_report, write_report

        sequence = max(sequences, key=len)[:REPORT_SEQUENCE_TOKENS]
        numbers = concentration_report(loaded.transformer, moments, sequence)
        folder = Path(report_dir) if report_dir else loaded.store_dir / "report"
        paths = write_report(numbers, folder)
        lines.append(
            f"reconstruction Pearson r over {len(sequence)} tokens: mean "
            f"{numbers['reconstruction']['pearson_mean']:.3f}, median {numbers['reconstruction']['pearson_median']:.3f}"
        )
        norms = numbers["key_norm_vs_attention"]
        lines.append(
            f"key norm vs attention received, Spearman: median {norms['spearman_median']:.3f}, negative in "
            f"{norms['fraction_negative']:.0%} of KV heads"
        )
        lines.append("report: " + ", ".join(str(p) for p in paths))
    if fit:
        if calib_files:
            long_sequences = text_file_sequences(loaded, calib_files, num_tokens, fit_seq_len)
            texts = [(f"calib_file/{index}", seq) for index, seq in enumerate(long_sequences)]
            # The choice needs texts the fit has not seen: the last quarter of the files' sequences.
            held_out = len(texts) // 4 if fit_choose else 0
            if fit_choose and not held_out:
                raise UserError(
                    f"--calib_file gives {len(texts)} sequences of --fit_seq_len {fit_seq_len} tokens: choosing the "
                    "fitted scorer holds a quarter of them out of the fit, so give at least 4 (more text, a smaller "
                    "--fit_seq_len), or pass --nofit_choose"
                )
            texts, choice_texts = texts[: len(texts) - held_out], texts[len(texts) - held_out :]
        else:
            texts = [(f"calibration/{index}", list(seq)) for index, seq in enumerate(sequences)]
            texts += fit_documents(loaded.tokenizer, fit_code_files, fit_seq_len)
            choice_texts = fit_documents(loaded.tokenizer, fit_code_files, fit_seq_len, skip=fit_code_files)
        fitted = fit_scorer(
            loaded.transformer,
            result.stats,
            moments.band_variance(),
            [tokens for _, tokens in texts],
            target=fit_target,
            start=fit_start,
            horizon=fit_horizon,
            budget=fit_budget,
            documents=[name for name, _ in texts],
        )
        if fit_choose:
            fitted = choose_scorer(
                loaded.transformer,
                result.stats,
                fitted,
                choice_texts,
                budget=fit_budget,
            )
        fit_path = fit_path or loaded.store_dir / FIT_FILE
        save_fit(fit_path, fitted)
        start, after = fitted.metadata["cross_entropy_start"], fitted.metadata["cross_entropy_fitted"]
        horizon = fit_horizon or "to the end"
        lines.append(
            f"fitted scorer: {fit_path} (target {fit_target}, horizon {horizon}, "
            f"{fitted.metadata['num_sequences']} sequences, "
            f"{fitted.metadata['num_tokens']} tokens); cross-entropy per layer, mean: {np.mean(start):.3f} at the "
            f"start ({fit_start}'s weights), {np.mean(after):.3f} fitted"
        )
        if fit_choose:
            chosen = fitted.metadata["selection"]
            lines.append(
                f"chosen at budget {fit_budget} on {len(chosen['fingerprints'])} held-out documents: blend "
                f"{fitted.metadata['blend']:g} of the fitted weights with Expected Attention's, aggregation "
                f"{fitted.metadata['aggregation']}, R-KV redundancy weight {fitted.metadata['redundancy_weight']:g}; "
                "mean KL " + ", ".join(f"{name} {kl:.4f}" for name, kl in chosen["mean_kl"].items())
            )
    return lines
