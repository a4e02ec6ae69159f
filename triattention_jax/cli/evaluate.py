"""Evaluate KV-cache methods against full attention on the real decode path.

  python -m triattention_jax.cli.evaluate --task fidelity --methods triattention,streaming,h2o,snapkv,rkv,random \
      --budgets 128,256,512,1024 --num_samples 6 --seq_len 4096 --out results/fidelity
  python -m triattention_jax.cli.evaluate --task needle --budgets 64,128,256 --num_samples 8 --seq_len 1024 \
      --out results/needle
  python -m triattention_jax.cli.evaluate --task dfs --budgets 128,256 --num_samples 15 --seq_len 2048 --out results/dfs
  python -m triattention_jax.cli.evaluate --task code --budgets 512,1024,2048 --num_samples 8 --seq_len 8192 \
      --out results/code
  python -m triattention_jax.cli.evaluate --task fidelity --budgets 512 --out results/fidelity_ablations \
      --methods "triattention,triattention:aggregation=per_layer_per_head,triattention:max_offset=4096"
  python -m triattention_jax.cli.evaluate --task fidelity --text_file notes.md --text_file main.py --seq_len 2048 \
      --budgets 256,512 --out results/my_texts

Tasks: fidelity and divergence compare each method with full attention; needle (pass-key
retrieval across four budgets of filler), dfs (the paper's recursive state query) and code
(the next lines of a long held-out Python source file: exact match and edit similarity) score
against the true answer, with full attention as a row. Finished (task, method, budget,
sample) cells in <out>/results.json are not recomputed. The table ends with the first method
compared with each other one on the samples both have. With --text_file, fidelity cuts each
file into sequences of --seq_len tokens and divergence continues each whole file for --seq_len
tokens, in place of the built-in texts.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from triattention_jax.cli import flags as shared
from triattention_jax.cli import run as runner
from triattention_jax.cli.run import run_cli
from triattention_jax.errors import UserError

FLAGS = flags.FLAGS
shared.define_model()
flags.DEFINE_enum("task", "fidelity", ["fidelity", "divergence", "needle", "dfs", "code"], "What to measure.")
flags.DEFINE_list(
    "methods",
    ["triattention", "streaming", "h2o", "snapkv", "rkv", "random"],
    "Methods compared with full "
    "attention, the first also with each other one; a variant for ablations: name:option=value;... "
    "(aggregation, window, max_offset, trig_term, norm_weighting, protect_prompt, slack_trigger), e.g. "
    "'triattention:max_offset=4096;window=64'.",
)
flags.DEFINE_list("budgets", ["128", "256", "512", "1024"], "KV budgets.")
flags.DEFINE_integer(
    "num_samples", None, "Samples per (method, budget); default: 3, or every sample the --text_file texts give."
)
flags.DEFINE_integer(
    "seq_len",
    4096,
    "Tokens per sequence (fidelity; needle: at least, its filler covers four budgets; code: the prompt, at most) "
    "or generated tokens (divergence; dfs: at most).",
)
flags.DEFINE_integer("seed", 0, "First sample index: another seed evaluates other texts and prompts.")
flags.DEFINE_multi_string(
    "text_file",
    None,
    "A UTF-8 text file of your own (repeat the flag for more) in place of the built-in texts, for --task "
    "fidelity (cut into sequences of --seq_len tokens) and divergence (each file whole is a prompt).",
)
shared.define_slack_trigger()
shared.define_dtype("float32")
flags.DEFINE_string("out", None, "Output folder (results.json, a markdown table, PNG plots).")
# The shared flags belong to this command: `--help` lists them.
flags.adopt_module_key_flags(shared)
flags.adopt_module_key_flags(runner)


def main(argv: list[str]) -> None:
    from tqdm import tqdm

    from triattention_jax.checkpoints.store import load_model
    from triattention_jax.eval.runner import check_study, evaluate
    from triattention_jax.eval.store import check_output_folder
    from triattention_jax.eval.texts import read_text_files
    from triattention_jax.files import pyplot

    if not FLAGS.out:
        raise UserError("--out is required: the folder that receives results.json, the table and the plots")
    check_output_folder(Path(FLAGS.out))
    texts = read_text_files(FLAGS.text_file or [])
    check_study(FLAGS.task, FLAGS.methods, texts)
    pyplot()
    budgets = shared.integers(FLAGS.budgets, "budgets")
    model = load_model(FLAGS.model, dtype=FLAGS.dtype)
    with tqdm(unit="cell", dynamic_ncols=True) as bar:

        def progress(done: int, total: int, running: str) -> None:
            bar.total = total
            bar.update(done - bar.n)
            bar.set_postfix_str(running)

        paths = evaluate(
            model,
            task=FLAGS.task,
            methods=FLAGS.methods,
            budgets=budgets,
            num_samples=FLAGS.num_samples,
            seq_len=FLAGS.seq_len,
            out=Path(FLAGS.out),
            seed=FLAGS.seed,
            progress=progress,
            slack_trigger=FLAGS.slack_trigger,
            texts=texts,
        )
    print(Path(paths[1]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    run_cli(main)
