"""What `decode.py` does, as a library function: load, encode, generate, report."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import jax
import numpy as np

from triattention_jax import sharding
from triattention_jax.checkpoint import load_model
from triattention_jax.errors import UserError
from triattention_jax.decoding import generate, prompt_bucket
from triattention_jax.policies import EvictionPolicy, PolicySettings, policy_class
from triattention_jax.prompts import check_writable, encode_prompts, has_chat_template, read_prompt_file, write_json_atomic
from triattention_jax.sampling import Sampler
from triattention_jax.slim import KV_CACHE_MODES, logprob_error, slim_transformer


def decode_prompts(
    *,
    model: str,
    prompt: str | None,
    prompt_file: str | None,
    chat: bool | None,
    max_new_tokens: int,
    ignore_eos: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    dtype: str,
    method: str,
    budget: int,
    protect_prompt: bool,
    window: int,
    stats: str | None,
    aggregation: str,
    offsets: list[str] | None,
    trig_term: bool,
    norm_weighting: bool,
    divide_length: int,
    output_json: str | None,
    kv_cache: str = "standard",
    slim_max_cond: float | None = None,
    mesh: str | None = None,
    on_text: Callable[[list[str]], None] | None = None,
) -> dict[str, Any]:
    """Generates for one prompt or a file of prompts; returns (and optionally writes) the report.

    mesh: a spec such as "data=2,model=4" (see `sharding.make_mesh`) to decode on a device
    mesh; a multi-host launch (see `sharding.initialize_distributed`) needs one.
    """
    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt or --prompt_file")
    texts = [prompt] if prompt is not None else read_prompt_file(prompt_file)
    if output_json:
        check_writable(output_json)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    if kv_cache not in KV_CACHE_MODES:
        raise UserError(f"unknown --kv_cache {kv_cache!r}: choose one of {', '.join(KV_CACHE_MODES)}")
    device_mesh = None
    if mesh is not None:
        sharding.initialize_distributed()
        device_mesh = sharding.make_mesh(mesh)
        sharding.check_batch(len(texts), device_mesh)
    loaded = load_model(model, dtype=dtype, mesh=device_mesh)
    transformer, slim_report = loaded.transformer, None
    if kv_cache == "slim":
        transformer, slim_report = slim_transformer(transformer, max_cond=slim_max_cond)
    settings = PolicySettings(
        budget=budget, protect_prompt=protect_prompt, window=window, stats=stats, aggregation=aggregation,
        offsets=_offsets(offsets), trigonometric=trig_term, norm_weighting=norm_weighting,
    )
    tokenizer = loaded.tokenizer
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    prompt_ids = encode_prompts(tokenizer, texts, chat=use_chat)
    policy = policy_class(method).from_settings(loaded, settings)
    if isinstance(policy, EvictionPolicy) and not _evicts(policy, prompt_ids, max_new_tokens, divide_length):
        print(f"note: --method {method} keeps {budget} tokens per KV head, more than this run ever caches (the longest "
              f"prompt plus --max_new_tokens={max_new_tokens}): nothing will be evicted; lower --budget to see eviction",
              file=sys.stderr)

    def stream(token_ids: list[list[int]]) -> None:
        if on_text is not None:
            on_text([tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids])

    result = generate(
        dataclasses.replace(loaded, transformer=transformer),
        prompt_ids,
        max_new_tokens=max_new_tokens,
        eos_ids=() if ignore_eos else loaded.config.eos_token_ids,
        sampler=sampler,
        policy=policy,
        divide_length=divide_length,
        seed=seed,
        on_round=stream,
        mesh=device_mesh,
    )
    generated = sum(result.num_generated_tokens)
    if slim_report is not None:
        slim_report = slim_report.to_dict() | {"logprob_error": _slim_error(loaded.transformer, transformer, prompt_ids[0],
                                                                             result.token_ids[0], divide_length)}
    payload = {
        "model": str(loaded.path),
        "method": method,
        "dtype": dtype,
        "kv_cache": kv_cache,
        "mesh": None if device_mesh is None else sharding.format_mesh(device_mesh),
        "slim": slim_report,
        "policy_settings": dataclasses.asdict(settings) if method != "full" else None,
        "divide_length": divide_length,
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
    if output_json and jax.process_index() == 0:
        write_json_atomic(output_json, payload)
    return payload



def _evicts(policy: EvictionPolicy, prompt_ids: list[list[int]], max_new_tokens: int, divide_length: int) -> bool:
    """Whether any compaction happens: the prefill's or a round's (the schedule `generate` follows)."""
    slots = prompt_bucket(max(map(len, prompt_ids)))
    rounds = -(-max_new_tokens // divide_length)
    return slots > policy.budget or bool(policy.compacting_rounds(slots, rounds, divide_length))


def _slim_error(standard, slim, prompt: list[int], generated: list[int], divide_length: int) -> dict[str, float] | None:
    """The K-only cache's measured log-prob error against the standard cache (full attention,
    same weights and dtype) over the first row's generated tokens, teacher-forced."""
    if len(generated) < 2:
        return None
    tokens = np.asarray([prompt + generated], np.int32)
    return logprob_error(standard, slim, tokens, prefill_length=len(prompt), divide_length=divide_length)


def _offsets(values: list[str] | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    try:
        return tuple(int(v) for v in values)
    except ValueError as e:
        raise UserError(f"--offsets takes comma-separated integers: {e}") from e
