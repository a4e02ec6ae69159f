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


def _compactions(policy, prompt_bucket: int, new_tokens: int, divide_length: int) -> int:
    """How many rounds start with a full buffer (the schedule is deterministic)."""
    num_slots = policy.num_slots(prompt_bucket, new_tokens, divide_length)
    cursor = min(prompt_bucket, policy.budget)
    count = 0
    for _ in range(-(-new_tokens // divide_length)):
        if cursor + divide_length > num_slots:
            cursor, count = policy.budget, count + 1
        cursor += divide_length
    return count


def time_compaction(policy, transformer, batch: int, prompt_tokens: int, divide_length: int) -> float:
    """Seconds for one compaction of a full buffer (random keys; the cost does not depend on values)."""
    from triattention_jax.cache import KVCache
    from triattention_jax.policies import RoundContext

    config = transformer.config
    slots = policy.budget + divide_length
    shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    keys = jax.random.normal(jax.random.key(0), shape, transformer.dtype)
    positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), shape[:-1])
    context = RoundContext(prompt_lengths=jnp.full((batch,), prompt_tokens, jnp.int32), position=jnp.full((batch,), slots, jnp.int32))
    compact = jax.jit(lambda p, c, ctx: p.compact(c, ctx).resized(slots))

    def fresh():
        return KVCache(k=keys, v=keys, pos=positions, cursor=jnp.asarray(slots, jnp.int32))

    jax.block_until_ready(compact(policy, fresh(), context))
    repeats = 5
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compact(policy, fresh(), context))
    return (time.perf_counter() - start) / repeats


def time_ours(loaded, method: str, dtype: str, batch: int, prompt_tokens: int, new_tokens: int) -> Measurement:
    """One run, timed from the end of its first round (which includes compilation) to the end;
    the later rounds compile nothing, so this is the steady decode rate."""
    from triattention_jax.generate import generate, prompt_bucket
    from triattention_jax.policies import PolicySettings, policy_class

    divide = FLAGS.divide_length
    if new_tokens <= divide:
        raise UserError(f"--new_tokens must exceed --divide_length ({divide}): the first round is not timed")
    policy = policy_class(method).from_settings(loaded, PolicySettings(budget=FLAGS.budget, stats=FLAGS.stats))
    transformer = loaded.transformer
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
        count = _compactions(policy, prompt_bucket(prompt_tokens), new_tokens, divide)
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


_BENCHMARK_FLAGS = ("model", "batch", "dtype", "methods", "new_tokens", "prompt_tokens", "budget", "divide_length", "stats", "hf")


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
        loaded = load_model(FLAGS.model, dtype=dtype)
        for batch in batches:
            for new_tokens in lengths:
                for method in FLAGS.methods:
                    results.append(time_ours(loaded, method, dtype, batch, FLAGS.prompt_tokens, new_tokens))
                    print(format_table(results[-1:]).splitlines()[-1], flush=True)
                if FLAGS.hf:
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
