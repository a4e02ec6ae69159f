"""transformers beside us: its steady per-step decode time at the same shapes (torch only here)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from triattention_jax.bench.speed import SYNTHETIC_PROMPT

# transformers' two ways of decoding with a static cache: eager PyTorch, and the forward
# `torch.compile`d as `generate` does by itself for a static cache on a GPU (inductor,
# "reduce-overhead": CUDA graphs).
HF_MODES = ("eager", "compiled")


def hf_step_seconds(source: str | dict, *, dtype: str, batch: int, max_cache_len: int, steps: int = 128) -> dict:
    """transformers' steady per-step decode time in each of `HF_MODES`, sdpa attention, one
    static cache of `max_cache_len` slots (allocated once, reset between runs): the difference
    between generating 8 + steps and 8 tokens after a short prompt, over steps, after an
    8-token warm-up (which compiles and records the CUDA graphs). `source`: a checkpoint
    folder, or an HF config.json dict (random weights). On CUDA when PyTorch sees a GPU, else
    on the CPU (eager only: transformers compiles by itself on accelerators only).
    Returns {mode: seconds}."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        if isinstance(source, dict):
            config = transformers.AutoConfig.for_model(**source)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, attn_implementation="sdpa"
            )
    model.eval()
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, model.config.vocab_size, (batch, SYNTHETIC_PROMPT), device=device)
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)

    def seconds(new_tokens: int, compiled: bool) -> float:
        cache.reset()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                past_key_values=cache,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                disable_compile=not compiled,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results = {}
    for mode in HF_MODES if device == "cuda" else HF_MODES[:1]:
        compiled = mode == "compiled"
        seconds(8, compiled)
        results[mode] = (seconds(8 + steps, compiled) - seconds(8, compiled)) / steps
    return results


def hf_step_seconds_subprocess(source: str | dict, dtype: str, batch: int, max_cache_len: int) -> dict:
    """`hf_step_seconds` in a child process, so PyTorch and JAX never share the device's
    memory; {} (with the reason on stderr) when it fails, e.g. out of memory."""
    code = (
        "import json, sys; from triattention_jax.bench.hf_reference import hf_step_seconds; "
        "a = json.loads(sys.argv[1]); print(json.dumps(hf_step_seconds(a['source'], dtype=a['dtype'], "
        "batch=a['batch'], max_cache_len=a['max_cache_len'])))"
    )
    args = json.dumps({"source": source, "dtype": dtype, "batch": batch, "max_cache_len": max_cache_len})
    result = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if result.returncode:
        print(f"transformers at batch {batch} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {}
    return json.loads(result.stdout.strip().splitlines()[-1])
