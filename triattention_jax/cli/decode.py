"""Generate text with full attention or a KV-cache eviction method.

python decode.py --prompt "What is the capital of France?"
python decode.py --model Qwen/Qwen3-0.6B --prompt_file prompts.txt --output_json out.json
"""

from __future__ import annotations

import dataclasses
import sys

from absl import flags

from triattention_jax.cli import flags as shared
from triattention_jax.cli import run as runner
from triattention_jax.cli.run import METHOD_NAMES, check_interrupted, run_cli
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH

FLAGS = flags.FLAGS
shared.define_model()
flags.DEFINE_string("prompt", None, "The prompt text.")
flags.DEFINE_string("prompt_file", None, "A text file with one prompt per line (decoded as one batch).")
flags.DEFINE_bool("chat", None, "Wrap each prompt in the tokenizer's chat template (default: when it has one).")
flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate per prompt.")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past EOS (benchmarks, tests).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 disables.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 disables.")
flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
shared.define_dtype("bfloat16")
flags.DEFINE_enum("method", "full", METHOD_NAMES, "KV-cache policy.")
shared.define_policy_settings()
flags.DEFINE_integer("divide_length", DEFAULT_DIVIDE_LENGTH, "Decode steps per round (eviction runs between rounds).")
flags.DEFINE_enum(
    "kv_cache",
    "standard",
    ["standard", "slim"],
    "standard: K and V; slim: K only, V recomputed from "
    "all heads' K (MHA checkpoints only; eviction methods then keep one token set per layer).",
)
flags.DEFINE_float(
    "slim_max_cond",
    None,
    "Layers whose cond(W_K) exceeds this keep K and V under --kv_cache slim "
    "(default: 1/unit roundoff of --dtype: 1.7e7 float32, 256 bfloat16).",
)
flags.DEFINE_enum(
    "slim_value_map",
    "auto",
    ["auto", "float32", "model"],
    "dtype of W_KV under --kv_cache slim, read at every step: auto keeps it in --dtype in each layer where "
    "that adds no more error to the recovered values than a standard cache's rounding of V (measured on the "
    "prompt against float64), else float32.",
)
shared.define_mesh(
    "Decode on a device mesh, e.g. data=2,model=4: rows split over data, heads and the MLP over model "
    "(data x model must divide the device count), or auto: every device, as many data-parallel replicas as fit "
    "(see sharding.choose_mesh). Multi-host launches need it."
)
flags.DEFINE_string("output_json", None, "Write prompts, token ids, texts and measurements here.")
# The shared flags belong to this command: `--help` lists them.
flags.adopt_module_key_flags(shared)
flags.adopt_module_key_flags(runner)


def main(argv: list[str]) -> None:
    from triattention_jax.pipeline import DecodeRequest, decode_prompts

    request = DecodeRequest(**{field.name: FLAGS[field.name].value for field in dataclasses.fields(DecodeRequest)})
    stream = StreamPrinter()
    payload = decode_prompts(request, shared.policy_settings(), on_text=stream)
    stream.finish(payload["texts"])
    slim = payload["slim"]
    if slim:
        conds = ", ".join(f"{c:.3g}" for c in slim["cond_wk"])
        fallback = ", ".join(map(str, slim["fallback_layers"])) or "none"
        print(
            f"[slim] K-only cache; cond(W_K) per layer: {conds} (threshold {slim['threshold']:.3g}; layers keeping "
            f"K and V: {fallback})",
            file=sys.stderr,
        )
        if any(slim["value_errors"]):
            measured = ", ".join(
                f"{e['value_map_rounding']:.2g}/{e['cache_rounding']:.2g}" for e in slim["value_errors"] if e
            )
            print(
                f"[slim] W_KV dtype per layer: {', '.join(d or 'none' for d in slim['value_map_dtypes'])} (relative "
                f"value error from rounding W_KV / from rounding V: {measured})",
                file=sys.stderr,
            )
        if slim["logprob_error"]:
            error = slim["logprob_error"]
            print(
                f"[slim] measured against the standard cache on the generated tokens: max |Δ log-prob| "
                f"{error['max_abs']:.3g} ({error['relative']:.3g} relative), top-1 agreement "
                f"{error['top1_agreement']:.3f}",
                file=sys.stderr,
            )
    print(
        f"[{payload['method']}] {sum(payload['num_generated_tokens'])} tokens in {payload['wall_seconds']:.2f}s, "
        f"compilation included ({payload['tokens_per_second']:.1f} tok/s), KV buffer "
        f"{payload['kv_cache_bytes'] / 2**20:.2f} MiB",
        file=sys.stderr,
    )


class StreamPrinter:
    """Prints text as it grows: a single prompt streams, a batch prints per row at the end."""

    def __init__(self):
        self.printed = 0

    def __call__(self, texts: list[str]) -> None:
        check_interrupted()
        if len(texts) == 1:
            sys.stdout.write(texts[0][self.printed :])
            sys.stdout.flush()
            self.printed = len(texts[0])

    def finish(self, texts: list[str]) -> None:
        if len(texts) == 1:
            self(texts)
            print()
            return
        for row, text in enumerate(texts):
            print(f"--- [{row}]\n{text}")


if __name__ == "__main__":
    run_cli(main)
