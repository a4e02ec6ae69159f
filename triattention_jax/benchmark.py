"""Decode throughput of our engine next to Hugging Face transformers' generate.

  python -m triattention_jax.benchmark --batch 1,8 --dtype bfloat16,float32 --new_tokens 256 --out bench.json

Each configuration is run once to compile, then timed; tokens/s counts generated tokens
(batch × new_tokens) over the whole generate call, prefill included, with EOS ignored.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any

import jax
import numpy as np
from absl import flags

from triattention_jax import embedded
from triattention_jax.cli import run_cli
from triattention_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", embedded.DEFAULT_MODEL_NAME, "HF checkpoint folder, hub id, or a folder name under models/.")
flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("dtype", ["bfloat16", "float32"], "Weight and cache dtypes.")
flags.DEFINE_integer("prompt_tokens", 64, "Prompt length (random token ids).")
flags.DEFINE_integer("new_tokens", 256, "Tokens generated per row.")
flags.DEFINE_integer("divide_length", 128, "Decode steps per round.")
flags.DEFINE_bool("hf", True, "Also time Hugging Face transformers' generate (needs torch).")
flags.DEFINE_string("out", None, "Write the results here as JSON.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurement:
    engine: str
    dtype: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.new_tokens / self.seconds


def time_ours(model_dir, dtype: str, batch: int, prompt_tokens: int, new_tokens: int, divide_length: int) -> Measurement:
    from triattention_jax.checkpoint import load_transformer
    from triattention_jax.generate import generate

    transformer = load_transformer(model_dir, dtype=dtype)
    prompts = np.random.default_rng(0).integers(0, transformer.config.vocab_size, (batch, prompt_tokens)).tolist()
    generate(transformer, prompts, max_new_tokens=new_tokens, divide_length=divide_length)
    start = time.perf_counter()
    result = generate(transformer, prompts, max_new_tokens=new_tokens, divide_length=divide_length)
    seconds = time.perf_counter() - start
    assert result.num_generated_tokens == [new_tokens] * batch
    return Measurement(engine="triattention-jax", dtype=dtype, batch=batch, prompt_tokens=prompt_tokens,
                       new_tokens=new_tokens, seconds=seconds)


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
    return Measurement(engine="transformers", dtype=dtype, batch=batch, prompt_tokens=prompt_tokens,
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


def main(argv: list[str]) -> None:
    from triattention_jax.checkpoint import resolve_model_dir
    from triattention_jax.prompts import check_writable, write_json_atomic

    if FLAGS.out:
        check_writable(FLAGS.out)
    try:
        batches = [int(b) for b in FLAGS.batch]
    except ValueError as e:
        raise UserError(f"--batch takes comma-separated integers: {e}") from e
    model_dir = resolve_model_dir(FLAGS.model)
    results = []
    for dtype in FLAGS.dtype:
        for batch in batches:
            results.append(time_ours(model_dir, dtype, batch, FLAGS.prompt_tokens, FLAGS.new_tokens, FLAGS.divide_length))
            if FLAGS.hf:
                results.append(time_hf(model_dir, dtype, batch, FLAGS.prompt_tokens, FLAGS.new_tokens))
            print(" ".join(f"{m.engine}:{m.tokens_per_second:.1f}" for m in results[-2:]), flush=True)
    print(f"\n{'engine':<18}{'dtype':<10}{'batch':>6}{'prompt':>8}{'new':>6}{'seconds':>10}{'tok/s':>10}")
    for m in results:
        print(f"{m.engine:<18}{m.dtype:<10}{m.batch:>6}{m.prompt_tokens:>8}{m.new_tokens:>6}{m.seconds:>10.2f}{m.tokens_per_second:>10.1f}")
    if FLAGS.out:
        rows = [{**dataclasses.asdict(m), "tokens_per_second": m.tokens_per_second} for m in results]
        write_json_atomic(FLAGS.out, {"environment": environment(), "model": str(model_dir), "results": rows})


if __name__ == "__main__":
    run_cli(main)
