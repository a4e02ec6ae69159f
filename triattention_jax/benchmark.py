"""Decode throughput and KV memory: our engine per method, next to transformers' generate.

  python -m triattention_jax.benchmark --batch 1,8 --dtype bfloat16,float32 --new_tokens 256
  python -m triattention_jax.benchmark --methods full,triattention --budget 256 --new_tokens 1024,4096 --batch 1 --dtype float32 --nohf

Our engine: one run per configuration, timed from the end of its first round (which holds
compilation and prefill) to the end, scaled to all new_tokens; EOS ignored. transformers: one
warm-up call, then the whole generate call. For eviction methods, the eviction share is
(compactions in the run × time of one compaction, measured alone on a full buffer) / decode time.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from triattention_jax import embedded
from triattention_jax.cli import run_cli
from triattention_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", embedded.DEFAULT_MODEL_NAME, "HF checkpoint folder, hub id, or a folder name under models/.")
flags.DEFINE_enum("preset", None, ["qwen3-8b", "llama3.1-8b", "qwen3-1.7b", "llama2-7b", "tiny"],
                  "Random weights at a real architecture's shape instead of --model (speed does not depend on values).")
flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("dtype", ["bfloat16", "float32"], "Weight and cache dtypes.")
flags.DEFINE_list("methods", ["full"], "KV policies to time.")
flags.DEFINE_list("new_tokens", ["256"], "Generation lengths.")
flags.DEFINE_integer("prompt_tokens", 64, "Prompt length (random token ids).")
flags.DEFINE_integer("budget", 2048, "Budget of the eviction methods.")
flags.DEFINE_integer("divide_length", 128, "Decode steps per round.")
flags.DEFINE_string("stats", None, "TriAttention statistics; default: the model folder's (calibrated on first use).")
flags.DEFINE_bool("hf", True, "Also time Hugging Face transformers' generate for full attention (needs torch).")
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurement:
    engine: str
    method: str
    dtype: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    kv_cache_bytes: int | None = None
    eviction_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.new_tokens / self.seconds

    @property
    def eviction_share(self) -> float | None:
        return None if self.eviction_seconds is None else self.eviction_seconds / self.seconds


def time_compaction(policy, transformer, batch: int, prompt_tokens: int, divide_length: int) -> float:
    """Seconds for one compaction of a full buffer, built by a real prefill of random tokens
    (so the policy's per-slot statistics and state are there too)."""
    from triattention_jax.cache import init_cache
    from triattention_jax.generate import extend_for_policy
    from triattention_jax.policies import RoundContext

    slots = policy.budget + divide_length
    tokens = jax.random.randint(jax.random.key(0), (batch, slots), 0, transformer.config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
    out = extend_for_policy(transformer, policy, None, tokens, positions, jnp.zeros(batch, jnp.int32))
    cache = init_cache(transformer.config, batch, slots, transformer.dtype).append(out.k, out.v, positions)
    cache = policy.start(cache, out, positions)
    context = RoundContext(prompt_lengths=jnp.full((batch,), prompt_tokens, jnp.int32), position=jnp.full((batch,), slots, jnp.int32))
    compact = jax.jit(lambda p, c, ctx: p.compact(c, ctx).resized(slots))
    jax.block_until_ready(compact(policy, cache, context))
    repeats = 5
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compact(policy, cache, context))
    return (time.perf_counter() - start) / repeats


def random_transformer(preset: str, dtype: str, seed: int = 0):
    """A model of the preset's shape with random weights generated on the device."""
    from triattention_jax.config import ModelConfig
    from triattention_jax.model import Transformer, weight_specs

    config = ModelConfig.from_hf(PRESETS[preset])
    key = jax.random.key(seed)
    weights = {}
    for index, (name, (shape, _)) in enumerate(sorted(weight_specs(config).items())):
        if name.endswith("norm"):
            weights[name] = jnp.ones(shape, dtype)
        else:
            weights[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, index), shape, dtype)
    return Transformer(config, weights, dtype=dtype)


def random_stats(transformer, seed: int = 0):
    from triattention_jax.scoring import FrequencyStats

    c = transformer.config
    shape = (c.num_layers, c.num_heads, c.head_dim // 2)
    keys = jax.random.split(jax.random.key(seed), 2)
    mean_re, mean_im = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    return FrequencyStats(q_mean_real=mean_re, q_mean_imag=mean_im, q_abs_mean=1.5 * jnp.sqrt(mean_re**2 + mean_im**2))


def build_policy(method: str, transformer, loaded):
    """The policy for a benchmark run; preset models get random TriAttention statistics."""
    from triattention_jax.policies import PolicySettings, TriAttention, policy_class

    if loaded is None and method == "triattention":
        return TriAttention.create(transformer, random_stats(transformer), budget=FLAGS.budget)
    return policy_class(method).from_settings(loaded, PolicySettings(budget=FLAGS.budget, stats=FLAGS.stats))


def time_ours(transformer, policy, method: str, dtype: str, batch: int, prompt_tokens: int, new_tokens: int) -> Measurement:
    """One run, timed from the end of its first round (which includes compilation) to the end;
    the later rounds compile nothing, so this is the steady decode rate."""
    from triattention_jax.generate import generate, prompt_bucket

    divide = FLAGS.divide_length
    if new_tokens <= divide:
        raise UserError(f"--new_tokens must exceed --divide_length ({divide}): the first round is not timed")
    prompts = np.random.default_rng(0).integers(0, transformer.config.vocab_size, (batch, prompt_tokens)).tolist()
    round_ends = []
    result = generate(transformer, prompts, max_new_tokens=new_tokens, divide_length=divide, policy=policy,
                      on_round=lambda _: round_ends.append(time.perf_counter()))
    if result.num_generated_tokens != [new_tokens] * batch:
        raise RuntimeError(f"expected {new_tokens} tokens per row, got {result.num_generated_tokens}")
    timed_tokens = new_tokens - divide
    seconds = (round_ends[-1] - round_ends[0]) * new_tokens / timed_tokens
    eviction = None
    if hasattr(policy, "compact"):
        count = len(policy.compacting_rounds(prompt_bucket(prompt_tokens), -(-new_tokens // divide), divide))
        eviction = count * time_compaction(policy, transformer, batch, prompt_tokens, divide)
    return Measurement(engine="triattention-jax", method=method, dtype=dtype, batch=batch, prompt_tokens=prompt_tokens,
                       new_tokens=new_tokens, seconds=seconds, kv_cache_bytes=result.kv_cache_bytes, eviction_seconds=eviction)


def time_hf(model_dir, dtype: str, batch: int, prompt_tokens: int, new_tokens: int) -> Measurement:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).eval()
    model.generation_config.eos_token_id = None
    prompts = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt_tokens)))
    mask = torch.ones_like(prompts)

    def run(n: int) -> None:
        with torch.no_grad():
            model.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    run(4)
    start = time.perf_counter()
    run(new_tokens)
    return Measurement(engine="transformers", method="full", dtype=dtype, batch=batch, prompt_tokens=prompt_tokens,
                       new_tokens=new_tokens, seconds=time.perf_counter() - start)


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


def format_table(results: list[Measurement]) -> str:
    header = f"{'engine':<18}{'method':<14}{'dtype':<10}{'batch':>6}{'new':>7}{'seconds':>10}{'tok/s':>9}{'KV MiB':>9}{'evict %':>9}"
    lines = [header]
    for m in results:
        kv = "" if m.kv_cache_bytes is None else f"{m.kv_cache_bytes / 2**20:.1f}"
        share = "" if m.eviction_share is None else f"{100 * m.eviction_share:.1f}"
        lines.append(f"{m.engine:<18}{m.method:<14}{m.dtype:<10}{m.batch:>6}{m.new_tokens:>7}{m.seconds:>10.2f}"
                     f"{m.tokens_per_second:>9.1f}{kv:>9}{share:>9}")
    return "\n".join(lines)


_BENCHMARK_FLAGS = ("model", "preset", "batch", "dtype", "methods", "new_tokens", "prompt_tokens", "budget", "divide_length", "stats", "hf")


def main(argv: list[str]) -> None:
    from triattention_jax.checkpoint import load_model
    from triattention_jax.policies import policy_class
    from triattention_jax.prompts import check_writable, write_json_atomic

    if FLAGS.out:
        check_writable(FLAGS.out)
    batches, lengths = _integers(FLAGS.batch, "batch"), _integers(FLAGS.new_tokens, "new_tokens")
    for method in FLAGS.methods:
        policy_class(method)
    results = []
    for dtype in FLAGS.dtype:
        loaded = None if FLAGS.preset else load_model(FLAGS.model, dtype=dtype)
        transformer = random_transformer(FLAGS.preset, dtype) if FLAGS.preset else loaded.transformer
        for batch in batches:
            for new_tokens in lengths:
                for method in FLAGS.methods:
                    policy = build_policy(method, transformer, loaded)
                    results.append(time_ours(transformer, policy, method, dtype, batch, FLAGS.prompt_tokens, new_tokens))
                    print(format_table(results[-1:]).splitlines()[-1], flush=True)
                if FLAGS.hf and loaded is not None:
                    results.append(time_hf(loaded.path, dtype, batch, FLAGS.prompt_tokens, new_tokens))
                    print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(results))
    if FLAGS.out:
        rows = [{**dataclasses.asdict(m), "tokens_per_second": m.tokens_per_second, "eviction_share": m.eviction_share}
                for m in results]
        write_json_atomic(FLAGS.out, {"environment": environment(), "model": FLAGS.model, "flags": {name: FLAGS[name].value for name in _BENCHMARK_FLAGS},
                                      "results": rows})


if __name__ == "__main__":
    run_cli(main)
