"""Save a converted model as an orbax checkpoint, or time reloading it.

python -m triattention_jax.cli.orbax --model smollm2-135m-instruct --out models/smollm2-orbax
python decode.py --model models/smollm2-orbax --mesh data=2 --prompt "..."
python -m triattention_jax.cli.orbax --model smollm2-135m-instruct --time_reload --json results/reload.json
"""

from __future__ import annotations

import sys

from absl import flags

from triattention_jax.cli import flags as shared
from triattention_jax.cli import run as runner
from triattention_jax.cli.run import run_cli
from triattention_jax.errors import UserError

FLAGS = flags.FLAGS
shared.define_model()
flags.DEFINE_string("out", None, "Write the orbax checkpoint folder here (must not exist yet).")
shared.define_dtype("float32", "Dtype of the saved weights.")
shared.define_stats("TriAttention statistics to include; default: the model folder's, when it has them.")
flags.DEFINE_bool(
    "time_reload",
    False,
    "Instead of saving: time restoring from orbax against converting the safetensors, each load in a fresh process.",
)
flags.DEFINE_integer("repeats", 5, "Timed loads of each kind with --time_reload.")
shared.define_mesh("With --time_reload: lay the weights out on this mesh, e.g. data=2,model=4 (default: one device).")
flags.DEFINE_string("json", None, "With --time_reload: write the measurements here as JSON.")
# The shared flags belong to this command: `--help` lists them.
flags.adopt_module_key_flags(shared)
flags.adopt_module_key_flags(runner)


def main(argv: list[str]) -> None:
    from triattention_jax import sharding
    from triattention_jax.bench.reload import time_reload
    from triattention_jax.checkpoints.orbax import save_orbax
    from triattention_jax.checkpoints.stats import STATS_FILE, load_stats
    from triattention_jax.checkpoints.store import load_model
    from triattention_jax.files import check_writable, write_json_atomic

    sharding.initialize_distributed()
    mesh = sharding.make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    if FLAGS.time_reload:
        if FLAGS.json:
            check_writable(FLAGS.json)
        if FLAGS.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {FLAGS.repeats}")
        result = time_reload(FLAGS.model, dtype=FLAGS.dtype, repeats=FLAGS.repeats, mesh=mesh)
        print(
            f"{result['model']} ({result['weight_bytes'] / 1e6:.0f} MB of {result['dtype']} weights), "
            f"mesh {result['mesh'] or 'one device'}, {result['repeats']} loads each, one process per load"
        )
        print(f"{'source':>12} {'median s':>9} {'min s':>9} {'max s':>9} {'GB/s':>7} {'file MB':>8}")
        for row in result["rows"]:
            print(
                f"{row['source']:>12} {row['median_seconds']:9.3f} {row['min_seconds']:9.3f} {row['max_seconds']:9.3f} "
                f"{row['weight_gb_per_second']:7.2f} {row['file_bytes'] / 1e6:8.0f}"
            )
        print(f"orbax restore is {result['speedup']:.2f}x as fast as converting the safetensors")
        if FLAGS.json:
            write_json_atomic(FLAGS.json, result)
        return
    if not FLAGS.out:
        raise UserError("give --out (the orbax checkpoint folder to write) or --time_reload")
    loaded = load_model(FLAGS.model, dtype=FLAGS.dtype)
    stats_path = FLAGS.stats or (loaded.store_dir / STATS_FILE if (loaded.store_dir / STATS_FILE).exists() else None)
    stats = load_stats(stats_path, loaded.transformer) if stats_path else loaded.stats
    out = save_orbax(loaded.transformer, loaded.path, FLAGS.out, stats=stats)
    print(f"wrote {out} ({'with' if stats is not None else 'without'} TriAttention statistics)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
