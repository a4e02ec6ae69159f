"""Calibrate TriAttention: per-head pre-RoPE query statistics, and a concentration report.

python calibrate.py                                   # default model, self-generated text
python calibrate.py --model Qwen/Qwen3-0.6B --calib_file a.txt --calib_file b.txt --num_tokens 50000
python calibrate.py --report --report_dir reports/smollm2
python calibrate.py --model qwen2.5-coder-0.5b-instruct --fit      # also fit triattention_fit's weights
"""

from __future__ import annotations

from absl import flags

from triattention_jax.cli import flags as shared
from triattention_jax.cli import run as runner
from triattention_jax.cli.run import run_cli

FLAGS = flags.FLAGS
shared.define_model()
flags.DEFINE_multi_string("calib_file", [], "Text file(s) to calibrate on; none: the model generates its own text.")
flags.DEFINE_integer("num_tokens", 16384, "Calibration tokens to use.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per calibration sequence taken from text files.")
flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
shared.define_dtype("float32", "Weights dtype during calibration.")
flags.DEFINE_string(
    "out",
    None,
    "Where to write the statistics (.safetensors, or .pt for the reference format); "
    "default: the model's folder under models/.",
)
flags.DEFINE_bool("report", False, "Also write the concentration report (JSON and PNG plots).")
flags.DEFINE_string("report_dir", None, "Folder for the report; default: <model folder>/report.")
flags.DEFINE_bool(
    "fit",
    False,
    "Also fit triattention_fit's weights on calibration traces, written beside the statistics "
    "(<out>.fit.safetensors, or the model folder's triattention_fit.safetensors).",
)
flags.DEFINE_enum(
    "fit_target",
    "output",
    ["attention", "output", "kept"],
    "What the fitted score predicts for each key: the attention future queries pay it, that times "
    "its value norm (its share of the attention output), or whether it is among the --fit_budget keys "
    "they pay the most (the set an oracle would keep).",
)
flags.DEFINE_enum(
    "fit_start",
    "prior",
    ["paper", "prior"],
    "Where the fit's optimiser starts: the paper's score (trigonometric + norm) or Expected Attention's score "
    "from the statistics (the prior the choice blends towards).",
)
flags.DEFINE_integer(
    "fit_budget",
    512,
    "The budget the fit is chosen at (--fit_choose), and the kept set's size of --fit_target kept.",
    lower_bound=1,
)
flags.DEFINE_bool(
    "fit_choose",
    True,
    "Choose how much of the fitted weights to blend with Expected Attention's score from the statistics, and "
    "how layers share token sets and how much R-KV's redundancy to mix in, by decoding documents the fit did not "
    "read at --fit_budget (lowest KL to full attention).",
)
flags.DEFINE_integer(
    "fit_code_files", 4, "Standard-library source files added to the fitting texts (none with --calib_file)."
)
flags.DEFINE_integer("fit_seq_len", 4096, "Tokens per added source file.")
flags.DEFINE_integer(
    "fit_horizon",
    512,
    "Future queries whose attention the fitted score predicts; 0: every later query of the fitting text.",
    lower_bound=0,
)
# The shared flags belong to this command: `--help` lists them.
flags.adopt_module_key_flags(shared)
flags.adopt_module_key_flags(runner)


def main(argv: list[str]) -> None:
    from triattention_jax.files import pyplot
    from triattention_jax.pipeline import run_calibration

    if FLAGS.report:
        pyplot()

    summary = run_calibration(
        model=FLAGS.model,
        calib_files=FLAGS.calib_file,
        num_tokens=FLAGS.num_tokens,
        seq_len=FLAGS.seq_len,
        batch_size=FLAGS.batch_size,
        dtype=FLAGS.dtype,
        out=FLAGS.out,
        report=FLAGS.report,
        report_dir=FLAGS.report_dir,
        fit=FLAGS.fit,
        fit_target=FLAGS.fit_target,
        fit_start=FLAGS.fit_start,
        fit_code_files=FLAGS.fit_code_files,
        fit_seq_len=FLAGS.fit_seq_len,
        fit_horizon=FLAGS.fit_horizon or None,
        fit_budget=FLAGS.fit_budget,
        fit_choose=FLAGS.fit_choose,
    )
    for line in summary:
        print(line)


if __name__ == "__main__":
    run_cli(main)
