"""Generate text with full attention or a KV-cache eviction method.

  python decode.py --prompt "What is the capital of France?"
  python decode.py --model Qwen/Qwen3-0.6B --prompt_file prompts.txt --output_json out.json
"""

from __future__ import annotations

import sys

from absl import flags

from triattention_jax import embedded
from triattention_jax.cli import METHOD_NAMES, run_cli
from triattention_jax.config import DEFAULT_DIVIDE_LENGTH

FLAGS = flags.FLAGS
flags.DEFINE_string("model", embedded.DEFAULT_MODEL_NAME, "HF checkpoint folder, orbax checkpoint folder (written by "
                    "python -m triattention_jax.orbax_store), hub id, or a folder name under models/.")
flags.DEFINE_string("prompt", None, "The prompt text.")
flags.DEFINE_string("prompt_file", None, "A text file with one prompt per line (decoded as one batch).")
flags.DEFINE_bool("chat", None, "Wrap each prompt in the tokenizer's chat template (default: when it has one).")
flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate per prompt.")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past EOS (benchmarks, tests).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 disables.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 disables.")
flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and KV cache dtype.")
flags.DEFINE_enum("method", "full", METHOD_NAMES, "KV-cache policy.")
flags.DEFINE_integer("budget", 2048, "KV entries kept per (layer, KV head) by eviction methods.")
flags.DEFINE_bool("protect_prompt", None, "Never evict prompt tokens (they count toward the budget); default: on for "
                  "triattention, off for the baselines.")
flags.DEFINE_integer("window", None, "Never evict the most recent N tokens; default: the method's (0 for triattention).")
flags.DEFINE_string("stats", None, "TriAttention statistics (.safetensors or reference .pt); default: the model folder's, calibrated on first use.")
flags.DEFINE_enum("aggregation", "per_head", ["per_head", "per_layer_per_head", "per_layer"], "How TriAttention shares token sets across layers and heads.")
flags.DEFINE_list("offsets", None, "TriAttention future offsets; default: 1, 2, 4, ..., 65536.")
flags.DEFINE_bool("trig_term", True, "TriAttention's trigonometric term (off: the paper's ablation).")
flags.DEFINE_bool("norm_weighting", True, "Weight TriAttention's norm term by (1 - R_f) (off: the paper's ablation).")
flags.DEFINE_integer("divide_length", DEFAULT_DIVIDE_LENGTH, "Decode steps per round (eviction runs between rounds).")
flags.DEFINE_enum("kv_cache", "standard", ["standard", "slim"], "standard: K and V; slim: K only, V recomputed from "
                  "all heads' K (MHA checkpoints only; eviction methods then keep one token set per layer).")
flags.DEFINE_float("slim_max_cond", None, "Layers whose cond(W_K) exceeds this keep K and V under --kv_cache slim (default: 1/unit "
                   "roundoff of --dtype: 1.7e7 float32, 256 bfloat16).")
flags.DEFINE_string("mesh", None, "Decode on a device mesh, e.g. data=2,model=4: rows split over data, heads and the MLP "
                    "over model (data x model must divide the device count). Multi-host launches need it.")
flags.DEFINE_string("output_json", None, "Write prompts, token ids, texts and measurements here.")


def main(argv: list[str]) -> None:
    from triattention_jax.decode_cli import decode_prompts

    stream = StreamPrinter()
    payload = decode_prompts(**{name: FLAGS[name].value for name in _DECODE_FLAGS}, on_text=stream)
    stream.finish(payload["texts"])
    slim = payload["slim"]
    if slim:
        conds = ", ".join(f"{c:.3g}" for c in slim["cond_wk"])
        fallback = ", ".join(map(str, slim["fallback_layers"])) or "none"
        print(f"[slim] K-only cache; cond(W_K) per layer: {conds} (threshold {slim['threshold']:.3g}; layers keeping "
              f"K and V: {fallback})", file=sys.stderr)
        if slim["logprob_error"]:
            error = slim["logprob_error"]
            print(f"[slim] measured against the standard cache on the generated tokens: max |Δ log-prob| "
                  f"{error['max_abs']:.3g} ({error['relative']:.3g} relative), top-1 agreement {error['top1_agreement']:.3f}",
                  file=sys.stderr)
    print(
        f"[{payload['method']}] {sum(payload['num_generated_tokens'])} tokens in {payload['wall_seconds']:.2f}s, compilation "
        f"included ({payload['tokens_per_second']:.1f} tok/s), KV buffer {payload['kv_cache_bytes'] / 2**20:.2f} MiB",
        file=sys.stderr,
    )


class StreamPrinter:
    """Prints text as rounds complete: a single prompt streams, a batch prints per row at the end."""

    def __init__(self):
        self.printed = 0
        self.batch = 0

    def __call__(self, texts: list[str]) -> None:
        self.batch = len(texts)
        if self.batch == 1:
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


_DECODE_FLAGS = (
    "model", "prompt", "prompt_file", "chat", "max_new_tokens", "ignore_eos", "temperature", "top_k", "top_p",
    "seed", "dtype", "method", "budget", "protect_prompt", "window", "stats", "aggregation", "offsets", "trig_term", "norm_weighting", "divide_length", "output_json",
    "kv_cache", "slim_max_cond", "mesh",
)


if __name__ == "__main__":
    run_cli(main)
