"""Calibrate TriAttention: per-head pre-RoPE query statistics, and a concentration report
(see `triattention_jax.cli.calibrate`).

  python calibrate.py                                   # default model, self-generated text
  python calibrate.py --model Qwen/Qwen3-0.6B --calib_file a.txt --calib_file b.txt --num_tokens 50000
  python calibrate.py --report --report_dir reports/smollm2
"""

from absl import flags

from triattention_jax.cli import calibrate as command
from triattention_jax.cli.run import run_cli

flags.adopt_module_key_flags(command)

if __name__ == "__main__":
    run_cli(command.main)
