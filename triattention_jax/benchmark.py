"""Decode speed and memory per KV method, with a roofline, next to transformers.

  python -m triattention_jax.benchmark --preset qwen3-8b --methods full,triattention --batch 1,16 \
      --prompt_tokens 1024 --new_tokens 16384 --largest_batch --out results/h100_qwen3_8b.json

What it measures (on whatever device JAX has; see `speed.py` for how):
- steady per-step decode time against buffer size and batch, per method (`--cache_lengths`
  for full attention; eviction methods have one fixed buffer), with bytes read per step, the
  achieved bytes/s and its fraction of a device-to-device copy measured in the same run;
- the share of eviction methods' decode time spent compacting;
- tokens/s for generating --new_tokens after --prompt_tokens, integrated from the step
  times over the buffer sizes the run passes through, and one real end-to-end `generate`
  run of --e2e_tokens to confirm it;
- KV bytes per sequence, peak device memory, and with --largest_batch the largest batch of
  each method in the same memory, timed;
- transformers (PyTorch, sdpa, static cache) at the same batch and cache length (--hf).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from triattention_jax import embedded
from triattention_jax.cli import run_cli
from triattention_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", embedded.DEFAULT_MODEL_NAME, "HF checkpoint folder, hub id, or a folder name under models/.")
flags.DEFINE_string("preset", None, "Random weights at a real architecture's shape instead of --model: one of "
                    "qwen3-8b, llama3.1-8b, qwen3-1.7b, llama2-7b, tiny, or a path to an HF config.json.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weight and cache dtype.")
flags.DEFINE_list("batch", ["1", "16"], "Batch sizes for the step-time table and the integrated rates.")
flags.DEFINE_list("methods", ["full", "triattention"], "KV policies to time.")
flags.DEFINE_integer("prompt_tokens", 1024, "Prompt length of the integrated and end-to-end runs.")
flags.DEFINE_integer("new_tokens", 16384, "Generated tokens of the integrated rate.")
flags.DEFINE_list("cache_lengths", [], "Full attention's buffer sizes to time (default: the smallest and largest "
                  "of its run, and one between).")
flags.DEFINE_integer("budget", 2048, "Budget of the eviction methods.")
flags.DEFINE_integer("divide_length", 128, "Decode steps per round.")
flags.DEFINE_integer("e2e_tokens", 4096, "Tokens of the end-to-end confirmation run at the first batch (0: none).")
flags.DEFINE_bool("largest_batch", False, "Also time each method at the largest batch that fits in the same memory.")
flags.DEFINE_float("memory_reserve", 0.1, "Share of device memory left free (allocator slack) when sizing batches.")
flags.DEFINE_string("stats", None, "TriAttention statistics; default: the model folder's (calibrated on first use).")
flags.DEFINE_list("kv_cache", ["standard"], "Cache layouts to time, each with every method: standard (K and V), slim "
                  "(K only, MHA models; eviction keeps one token set per layer).")
flags.DEFINE_bool("hf", True, "Also time transformers at the same shapes (needs torch).")
flags.DEFINE_string("mesh", None, "Time decoding on a device mesh, e.g. data=2,model=4 (see decode.py --mesh); bytes per "
                    "step and the roofline are then one device's.")
flags.DEFINE_string("out", None, "Write the results here as JSON.")


# HF config.json fields of real architectures, for random-weight speed runs.
_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "head_dim": 128, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 40960}
PRESETS = {
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen3-1.7b": {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "llama3.1-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                    "max_position_embeddings": 131072, "tie_word_embeddings": False,
                    "rope_scaling": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama2-7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
                  "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "tiny": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192, "tie_word_embeddings": True},
}
# Multi-head attention at the tiny shape, for the K-only (slim) cache on the CPU.
PRESETS["tiny-mha"] = {**PRESETS["tiny"], "num_key_value_heads": 4, "head_dim": 16}


def preset_config(preset: str) -> dict[str, Any]:
    if preset in PRESETS:
        return PRESETS[preset]
    if os.path.isfile(preset):
        return json.loads(open(preset).read())
    raise UserError(f"--preset {preset!r} is neither one of {', '.join(PRESETS)} nor a config.json file")


def random_transformer(preset: str, dtype: str, seed: int = 0):
    """A model of the preset's shape with random weights generated on the device, layer by
    layer (no stacked temporaries that would leave the device memory fragmented)."""
    from triattention_jax.config import ModelConfig
    from triattention_jax.model import LAYER_WEIGHTS, Transformer, weight_specs

    config = ModelConfig.from_hf(preset_config(preset))
    key = jax.random.key(seed)

    def draw(name: str, index: int, shape: tuple[int, ...]) -> jax.Array:
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        return 0.02 * jax.random.normal(jax.random.fold_in(key, index), shape, dtype)

    weights = {}
    for index, (name, (shape, _)) in enumerate(sorted(weight_specs(config).items())):
        if name in LAYER_WEIGHTS:
            weights[name] = [draw(name, index * config.num_layers + layer, shape[1:]) for layer in range(config.num_layers)]
        else:
            weights[name] = draw(name, index, shape)
    return Transformer(config, weights, dtype=dtype)


def random_stats(transformer, seed: int = 0):
    from triattention_jax.scoring import FrequencyStats

    c = transformer.config
    shape = (c.num_layers, c.num_heads, c.head_dim // 2)
    keys = jax.random.split(jax.random.key(seed), 2)
    mean_re, mean_im = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    return FrequencyStats(q_mean_real=mean_re, q_mean_imag=mean_im, q_abs_mean=1.5 * jnp.sqrt(mean_re**2 + mean_im**2))


def build_policy(method: str, transformer, loaded):
    """The policy for a benchmark run; preset models get random TriAttention statistics.
    With a K-only cache TriAttention keeps one token set per layer (all heads share it)."""
    from triattention_jax.policies import PolicySettings, TriAttention, policy_class

    aggregation = "per_layer" if transformer.slim else "per_head"
    if loaded is None and method == "triattention":
        return TriAttention.create(transformer, random_stats(transformer), budget=FLAGS.budget, aggregation=aggregation)
    settings = PolicySettings(budget=FLAGS.budget, stats=FLAGS.stats, aggregation=aggregation)
    return policy_class(method).from_settings(loaded, settings)


def cache_variants(transformer, modes: list[str]) -> dict[str, Any]:
    """kv_cache mode -> the model to time with it. Speed does not depend on the values, so a
    preset's random W_K is not held to the conditioning threshold; a checkpoint is."""
    from triattention_jax.slim import KV_CACHE_MODES, slim_transformer

    unknown = set(modes) - set(KV_CACHE_MODES)
    if unknown or not modes:
        raise UserError(f"--kv_cache takes {', '.join(KV_CACHE_MODES)}; got {', '.join(modes) or 'nothing'}")
    max_cond = float("inf") if FLAGS.preset else None
    return {mode: transformer if mode == "standard" else slim_transformer(transformer, max_cond=max_cond)[0]
            for mode in modes}


def environment() -> dict[str, Any]:
    import flax
    import transformers

    env = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(), "jax": jax.__version__,
           "flax": flax.__version__, "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return env


def _integers(values: list[str], flag: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError as e:
        raise UserError(f"--{flag} takes comma-separated integers: {e}") from e


def hf_step_seconds_subprocess(source: str | dict, dtype: str, batch: int, max_cache_len: int) -> float | None:
    """`speed.hf_step_seconds` in a child process, so PyTorch and JAX never share the device's
    memory; None (with the reason on stderr) when it fails, e.g. out of memory."""
    code = ("import json, sys; from triattention_jax.speed import hf_step_seconds; "
            "a = json.loads(sys.argv[1]); print(json.dumps(hf_step_seconds(a['source'], dtype=a['dtype'], "
            "batch=a['batch'], max_cache_len=a['max_cache_len'])))")
    args = json.dumps({"source": source, "dtype": dtype, "batch": batch, "max_cache_len": max_cache_len})
    result = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if result.returncode:
        print(f"transformers at batch {batch} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(result.stdout.strip().splitlines()[-1])


def step_row(step, copy_bandwidth: float) -> dict[str, Any]:
    achieved = step.bytes_per_step / step.step_seconds
    return {**dataclasses.asdict(step), "tokens_per_second": step.tokens_per_second, "bytes_per_second": achieved,
            "roofline_fraction": achieved / copy_bandwidth}


def format_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format); empty where a row lacks the key or holds None."""
    widths = [max(len(h), 9) for h, _, _ in columns]
    lines = ["".join(h.rjust(w + 1) for (h, _, _), w in zip(columns, widths))]
    for row in rows:
        cells = [format(row[k], f) if row.get(k) is not None else "" for _, k, f in columns]
        lines.append("".join(c.rjust(w + 1) for c, w in zip(cells, widths)))
    return "\n".join(lines)


STEP_COLUMNS = [("method", "method", ""), ("kv_cache", "kv_cache", ""), ("batch", "batch", "d"), ("slots", "slots", "d"), ("ms/step", "ms", ".2f"),
                ("tok/s", "tokens_per_second", ".1f"), ("GB/step", "gb", ".2f"), ("roofline", "roofline_fraction", ".1%"),
                ("evict", "eviction_share", ".1%")]
RUN_COLUMNS = [("method", "method", ""), ("kv_cache", "kv_cache", ""), ("batch", "batch", "d"), ("KV MiB/seq", "kv_mib_per_sequence", ".1f"),
               ("tok/s", "tokens_per_second", ".1f"), ("e2e tok/s", "e2e_tokens_per_second", ".1f"),
               ("e2e pred", "e2e_predicted_tokens_per_second", ".1f"), ("HF tok/s", "hf_tokens_per_second", ".1f"),
               ("roofline", "final_roofline_fraction", ".1%"), ("evict", "eviction_share", ".1%")]


def main(argv: list[str]) -> None:
    from triattention_jax import speed
    from triattention_jax.checkpoint import load_model
    from triattention_jax.decoding import buffer_schedule
    from triattention_jax.policies import policy_class
    from triattention_jax.prompts import check_writable, write_json_atomic

    from triattention_jax import sharding

    if FLAGS.out:
        check_writable(FLAGS.out)
    batches = _integers(FLAGS.batch, "batch")
    if not batches and not FLAGS.largest_batch:
        raise UserError("give --batch sizes, or --largest_batch (or both)")
    mesh = None
    if FLAGS.mesh:
        if FLAGS.largest_batch:
            raise UserError("--largest_batch sizes one device's memory: run it without --mesh")
        sharding.initialize_distributed()
        mesh = sharding.make_mesh(FLAGS.mesh)
        for batch in batches:
            sharding.check_batch(batch, mesh)
    for method in FLAGS.methods:
        policy_class(method)
    hf_source = preset_config(FLAGS.preset) if FLAGS.preset else None
    loaded = None if FLAGS.preset else load_model(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh)
    hf_source = hf_source if FLAGS.preset else str(loaded.path)
    P, N, divide = FLAGS.prompt_tokens, FLAGS.new_tokens, FLAGS.divide_length
    hf_seconds = {}
    if FLAGS.hf and importlib.util.find_spec("torch") is None:
        raise UserError("--hf times transformers, which needs torch: pip install 'triattention-jax[torch]', or pass --nohf")
    if FLAGS.hf:
        # Before JAX takes the device: PyTorch runs in a child process that exits first.
        for batch in batches:
            hf_seconds[batch] = hf_step_seconds_subprocess(hf_source, FLAGS.dtype, batch, P + N)
    base = random_transformer(FLAGS.preset, FLAGS.dtype) if FLAGS.preset else loaded.transformer
    if mesh is not None:
        base = sharding.shard_transformer(base, mesh)
    variants = cache_variants(base, FLAGS.kv_cache)
    bandwidth = speed.copy_bandwidth()
    weights = speed.weight_bytes(base)
    memory_limit, _ = speed.device_memory()
    steps, runs = [], []

    def save() -> None:
        """Rewritten after every row, so a run cut short still leaves what it measured."""
        if FLAGS.out:
            _, peak = speed.device_memory()
            write_json_atomic(FLAGS.out, {
                "environment": environment(), "model": FLAGS.preset or FLAGS.model,
                "flags": {name: FLAGS[name].value for name in _BENCHMARK_FLAGS},
                "copy_bytes_per_second": bandwidth, "weight_bytes": weights, "memory_limit_bytes": memory_limit,
                "peak_memory_bytes": peak, "hf_step_seconds": hf_seconds, "steps": steps, "runs": runs,
            })

    def timed(transformer, policy, method: str, kv_cache: str, batch: int) -> tuple[list, Any]:
        """Step times over the run's buffer sizes and the fit through them."""
        schedule = buffer_schedule(policy, P, N, divide)
        sizes = sorted(set(schedule))
        if len(sizes) > 1:
            chosen = _integers(FLAGS.cache_lengths, "cache_lengths") if FLAGS.cache_lengths else [sizes[0], sizes[len(sizes) // 2], sizes[-1]]
            sizes = sorted({min(sizes, key=lambda s: abs(s - c)) for c in chosen})
        measured = [speed.measure_step(transformer, policy, method, batch=batch, slots=s, divide_length=divide, mesh=mesh)
                    for s in sizes]
        for step in measured:
            steps.append({**step_row(step, bandwidth), "kv_cache": kv_cache, "ms": 1e3 * step.step_seconds,
                          "gb": step.bytes_per_step / 1e9})
            print(format_rows(steps[-1:], STEP_COLUMNS).splitlines()[-1], flush=True)
        return measured, speed.linear_fit([(m.slots, m.step_seconds) for m in measured])

    for kv_cache, transformer in variants.items():
        for method in FLAGS.methods:
            policy = build_policy(method, transformer, loaded)
            memory = speed.sequence_memory(transformer, policy, P, N, divide)
            schedule = buffer_schedule(policy, P, N, divide)
            run_batches = [(b, False) for b in batches]
            if FLAGS.largest_batch and memory_limit:
                largest = speed.largest_batch(memory_limit, speed.weight_bytes(transformer), memory, FLAGS.memory_reserve)
                print(f"{method} ({kv_cache}): largest batch {largest} (KV {memory.buffer / 2**20:.1f} MiB and scratch "
                      f"{memory.scratch / 2**20:.1f} MiB per sequence)", flush=True)
                run_batches.append((largest, True))
            for batch, is_largest in run_batches:
                if batch < 1:
                    print(f"{method}: no batch fits in {memory_limit / 2**30:.1f} GiB", file=sys.stderr)
                    continue
                measured, fit = timed(transformer, policy, method, kv_cache, batch)
                seconds = speed.integrated_seconds(fit, schedule, divide)
                row = {"method": method, "kv_cache": kv_cache, "batch": batch, "largest_batch": is_largest, "prompt_tokens": P,
                       "new_tokens": N, "weight_bytes": speed.weight_bytes(transformer),
                       "kv_bytes_per_sequence": memory.buffer, "kv_mib_per_sequence": memory.buffer / 2**20,
                       "scratch_bytes_per_sequence": memory.scratch, "fixed_scratch_bytes": memory.fixed_scratch,
                       "integrated_seconds": seconds, "tokens_per_second": batch * N / seconds,
                       "final_roofline_fraction": step_row(measured[-1], bandwidth)["roofline_fraction"],
                       "eviction_share": measured[-1].eviction_share,
                       "hf_tokens_per_second": None if hf_seconds.get(batch) is None or method != "full" else batch / hf_seconds[batch]}
                if FLAGS.e2e_tokens and batch == run_batches[0][0] and not is_largest:
                    e2e = speed.end_to_end(transformer, policy, batch=batch, prompt_tokens=P, new_tokens=FLAGS.e2e_tokens,
                                           divide_length=divide, mesh=mesh)
                    predicted = sum(divide * fit(s) for s in e2e["steady_round_slots"])
                    row.update(e2e=e2e, e2e_tokens_per_second=e2e["steady_tokens_per_second"],
                               e2e_predicted_tokens_per_second=batch * divide * e2e["steady_rounds"] / predicted if predicted else None)
                runs.append(row)
                print(format_rows(runs[-1:], RUN_COLUMNS).splitlines()[-1], flush=True)
                save()
    _, peak = speed.device_memory()
    print(f"\n{environment()['device']}: copy {bandwidth / 1e9:.0f} GB/s, weights {weights / 1e9:.2f} GB, "
          f"peak memory {peak / 2**30 if peak else float('nan'):.1f} GiB of {memory_limit / 2**30 if memory_limit else float('nan'):.1f}")
    print("\nsteady decode steps\n" + format_rows(steps, STEP_COLUMNS))
    print(f"\n{N} tokens after a {P}-token prompt\n" + format_rows(runs, RUN_COLUMNS))
    save()


_BENCHMARK_FLAGS = ("model", "preset", "dtype", "batch", "methods", "prompt_tokens", "new_tokens", "cache_lengths", "budget",
                    "divide_length", "e2e_tokens", "largest_batch", "memory_reserve", "stats", "kv_cache", "hf", "mesh")


if __name__ == "__main__":
    run_cli(main)
