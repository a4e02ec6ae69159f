"""Generate text with full attention or a KV-cache eviction method (see `triattention_jax.cli.decode`).

python decode.py --prompt "What is the capital of France?"
python decode.py --model Qwen/Qwen3-0.6B --prompt_file prompts.txt --output_json out.json
"""

from absl import flags

from triattention_jax.cli import decode as command
from triattention_jax.cli.run import run_cli

flags.adopt_module_key_flags(command)

if __name__ == "__main__":
    run_cli(command.main)
