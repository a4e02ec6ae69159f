"""Decode speed and memory per KV method, with a roofline, next to transformers.

  python -m triattention_jax.cli.benchmark --preset qwen3-8b --methods full,triattention --batch 1,16 \
      --prompt_tokens 1024 --new_tokens 16384 --largest_batch --out results/h100_qwen3_8b.json

What it measures (on whatever device JAX has; see `bench/speed.py` for how):
- the roofline: the larger of a device-to-device copy (bytes read + written) and a read-only
  reduction (bytes read), 4 GiB each (the CPU: a small size), in the same run;
- steady per-step decode time against the filled length and batch, per method (full
  attention: its one buffer filled to several lengths, `--cache_lengths`; eviction methods:
  their fixed buffer, full), with the bytes a step needs to read, the achieved bytes/s and
  its fraction of the roofline;
- the share of eviction methods' decode time spent compacting;
- tokens/s for generating --new_tokens after --prompt_tokens, integrated from the step
  times over the lengths the run passes through (and its bytes over its time against the
  roofline), and one real end-to-end `generate` run of --e2e_tokens to confirm it;
- KV bytes per sequence, peak device memory, and with --largest_batch the largest batch of
  each method in the same memory, timed;
- transformers (PyTorch, sdpa, one static cache of prompt + generated slots), eager and
  `torch.compile`d, at each --batch (--hf), in a child process before JAX takes the device.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from absl import flags

from triattention_jax.cli import flags as shared
from triattention_jax.cli import run as runner
from triattention_jax.cli.run import run_cli
from triattention_jax.errors import UserError

FLAGS = flags.FLAGS
shared.define_model()
flags.DEFINE_string(
    "preset",
    None,
    "Random weights at a real architecture's shape instead of --model: one of "
    "qwen3-8b, llama3.1-8b, qwen3-1.7b, llama2-7b, tiny, or a path to an HF config.json.",
)
shared.define_dtype("bfloat16")
flags.DEFINE_list("batch", ["1", "16"], "Batch sizes for the step-time table and the integrated rates.")
flags.DEFINE_list("methods", ["full", "triattention"], "KV policies to time.")
flags.DEFINE_integer("prompt_tokens", 1024, "Prompt length of the integrated and end-to-end runs.")
flags.DEFINE_integer("new_tokens", 16384, "Generated tokens of the integrated rate.")
flags.DEFINE_list(
    "cache_lengths",
    [],
    "Full attention's filled lengths to time, each rounded to a round's starting cursor (default: its first, "
    "middle and last round's).",
)
shared.define_budget("Budget of the eviction methods.")
shared.define_slack_trigger()
flags.DEFINE_integer("divide_length", 128, "Decode steps per round.")
flags.DEFINE_integer("e2e_tokens", 4096, "Tokens of the end-to-end confirmation run at the first batch (0: none).")
flags.DEFINE_bool("largest_batch", False, "Also time each method at the largest batch that fits in the same memory.")
flags.DEFINE_float("memory_reserve", 0.1, "Share of device memory left free (allocator slack) when sizing batches.")
shared.define_stats("TriAttention statistics; default: the model folder's (calibrated on first use).")
flags.DEFINE_list(
    "kv_cache",
    ["standard"],
    "Cache layouts to time, each with every method: standard (K and V), slim "
    "(K only, MHA models; eviction keeps one token set per layer).",
)
flags.DEFINE_enum(
    "slim_value_map",
    "auto",
    ["auto", "float32", "model"],
    "dtype of W_KV for --kv_cache slim (see decode.py): auto measures each layer's value error on probe tokens.",
)
flags.DEFINE_bool("hf", True, "Also time transformers at the same shapes (needs torch).")
shared.define_mesh(
    "Time decoding on a device mesh, e.g. data=2,model=4 (see decode.py --mesh), or auto: chosen for "
    "throughput over every device; bytes per step and the roofline are then one device's."
)
flags.DEFINE_list(
    "devices",
    [],
    "Device counts to time in turn, e.g. 1,2,4: each over the first that many devices with the mesh --mesh auto "
    "would choose (one device: no mesh), then a table of tokens/s and speed-up per method.",
)
# Ops of a profiled round printed, and kept in the JSON.
PRINTED_OPS = 8
PROFILED_OPS = 24
flags.DEFINE_bool(
    "profile",
    False,
    "Trace one more round per timed batch and print where its device time goes (its largest ops; the JSON keeps "
    "more). On a GPU, XLA_FLAGS=--xla_gpu_enable_command_buffer= keeps every kernel's op name in the trace.",
)
flags.DEFINE_string("out", None, "Write the results here as JSON.")
# The shared flags belong to this command: `--help` lists them.
flags.adopt_module_key_flags(shared)
flags.adopt_module_key_flags(runner)


def main(argv: list[str]) -> None:
    import jax
    from jax.sharding import Mesh

    from triattention_jax import sharding
    from triattention_jax.bench import speed
    from triattention_jax.bench.hf_reference import HF_MODES, hf_step_seconds_subprocess
    from triattention_jax.bench.presets import (
        cache_variants,
        preset_config,
        random_calibration,
        random_fit,
        random_transformer,
    )
    from triattention_jax.bench.report import (
        RUN_COLUMNS,
        SCALING_COLUMNS,
        STEP_COLUMNS,
        environment,
        format_rows,
        scaling_rows,
        step_row,
    )
    from triattention_jax.checkpoints.store import load_model, resolve_model_dir
    from triattention_jax.config import ModelConfig
    from triattention_jax.decoding import prompt_bucket
    from triattention_jax.files import check_writable, write_json_atomic
    from triattention_jax.methods import PolicySettings, build_policy, parse_method
    from triattention_jax.model import Transformer
    from triattention_jax.policies import FullAttention

    if FLAGS.out:
        check_writable(FLAGS.out)
    batches = shared.integers(FLAGS.batch, "batch")
    if not batches and not FLAGS.largest_batch:
        raise UserError("give --batch sizes, or --largest_batch (or both)")
    counts = shared.integers(FLAGS.devices, "devices")
    if counts and FLAGS.mesh not in (None, "auto"):
        raise UserError("--devices chooses a mesh per device count: give --mesh auto, or no --mesh, with it")
    if FLAGS.mesh or counts:
        sharding.initialize_distributed()
    if FLAGS.mesh == "auto" and not counts:
        counts = [jax.device_count()]
    for count in counts:
        if count > jax.device_count():
            raise UserError(f"--devices {count}: JAX sees only {jax.device_count()} devices")
    for method in FLAGS.methods:
        parse_method(method)
    P, N, divide = FLAGS.prompt_tokens, FLAGS.new_tokens, FLAGS.divide_length

    def mesh_for(config: ModelConfig, count: int | None) -> Mesh | None:
        """--mesh as named; with a device count, chosen for throughput over the first `count`
        devices (`sharding.choose_mesh`, sized for full attention's buffer); one device or
        neither: no mesh."""
        if count is None:
            mesh = sharding.make_mesh(FLAGS.mesh) if FLAGS.mesh else None
        elif count == 1:
            mesh = None
        else:
            sizes = sharding.choose_mesh(
                config,
                FLAGS.dtype,
                devices=count,
                batches=batches,
                num_slots=FullAttention().num_slots(prompt_bucket(P), N, divide),
                memory_bytes=speed.device_memory()[0],
                reserve=FLAGS.memory_reserve,
            )
            mesh = sharding.make_mesh(sizes, jax.devices()[:count])
            print(f"{count} devices: mesh {sharding.format_mesh(mesh)}", flush=True)
        for batch in batches if mesh is not None else ():
            sharding.check_batch(batch, mesh)
        return mesh

    def load(count: int | None) -> tuple[Any, Transformer, Mesh | None]:
        """(the loaded checkpoint or None, the model on its mesh, the mesh)."""
        if FLAGS.preset:
            mesh = mesh_for(ModelConfig.from_hf(preset_config(FLAGS.preset)), count)
            base = random_transformer(FLAGS.preset, FLAGS.dtype)
            return None, base if mesh is None else sharding.shard_transformer(base, mesh), mesh
        loaded = load_model(FLAGS.model, dtype=FLAGS.dtype, mesh_for=lambda config, _: mesh_for(config, count))
        return loaded, loaded.transformer, loaded.mesh

    hf_source = preset_config(FLAGS.preset) if FLAGS.preset else str(resolve_model_dir(FLAGS.model))
    hf_seconds: dict[int, dict[str, float]] = {}
    if FLAGS.hf and importlib.util.find_spec("torch") is None:
        raise UserError(
            "--hf times transformers, which needs torch: pip install 'triattention-jax[torch]', or pass --nohf"
        )
    if FLAGS.hf:
        # Before JAX takes the device: PyTorch runs in a child process that exits first.
        for batch in batches:
            hf_seconds[batch] = hf_step_seconds_subprocess(hf_source, FLAGS.dtype, batch, P + N)
            rates = ", ".join(f"{mode} {batch / seconds:.1f}" for mode, seconds in hf_seconds[batch].items())
            print(f"transformers at batch {batch}, {P + N} slots: {rates or 'failed'} tok/s", flush=True)
    # Before the weights: the roofline's arrays then leave no holes among them.
    roofline = speed.roofline()
    bandwidth = roofline["roofline_bytes_per_second"]
    memory_limit, _ = speed.device_memory()
    steps, runs, slim_reports, weights = [], [], {}, []

    def save() -> None:
        """Rewritten after every row, so a run cut short still leaves what it measured."""
        if FLAGS.out:
            _, peak = speed.device_memory()
            write_json_atomic(
                FLAGS.out,
                {
                    "environment": environment(),
                    "model": FLAGS.preset or FLAGS.model,
                    "flags": {name: FLAGS[name].value for name in _BENCHMARK_FLAGS},
                    "roofline": roofline,
                    "weight_bytes": weights[0],
                    "slim": slim_reports,
                    "memory_limit_bytes": memory_limit,
                    "peak_memory_bytes": peak,
                    "hf_step_seconds": hf_seconds,
                    "steps": steps,
                    "runs": runs,
                },
            )

    def placement(mesh: Mesh | None) -> dict[str, Any]:
        return {
            "devices": 1 if mesh is None else mesh.size,
            "mesh": None if mesh is None else sharding.format_mesh(mesh),
        }

    for count in counts or [None]:
        loaded, base, mesh = load(count)
        weights.append(speed.weight_bytes(base))
        variants = cache_variants(
            base, FLAGS.kv_cache, random_weights=bool(FLAGS.preset), value_map=FLAGS.slim_value_map
        )
        slim_reports.update({mode: report.to_dict() for mode, (_, report) in variants.items() if report is not None})

        def timed(
            transformer, policy, method: str, kv_cache: str, batch: int, mesh: Mesh | None
        ) -> tuple[list, Any, Any]:
            """Step times at the timed fills of the run's one buffer, and the fits of seconds and
            bytes per step through them."""
            fills = speed.timed_fills(policy, P, N, divide)
            if FLAGS.cache_lengths and len(fills) > 1:
                starts = speed.round_fills(policy, P, N, divide)
                chosen = shared.integers(FLAGS.cache_lengths, "cache_lengths")
                fills = sorted({min(starts, key=lambda s: abs(s - c)) for c in chosen})
            slots = policy.num_slots(prompt_bucket(P), N, divide)
            measured = speed.measure_steps(
                transformer,
                policy,
                method,
                batch=batch,
                slots=slots,
                fills=fills,
                divide_length=divide,
                mesh=mesh,
                profile=FLAGS.profile,
            )
            for step in measured:
                steps.append(
                    {
                        **step_row(step, bandwidth),
                        "kv_cache": kv_cache,
                        **placement(mesh),
                        "ms": 1e3 * step.step_seconds,
                        "gb": step.bytes_per_step / 1e9,
                    }
                )
                print(format_rows(steps[-1:], STEP_COLUMNS).splitlines()[-1], flush=True)
                if step.profile is not None:
                    steps[-1]["ops"] = step.profile.top(PROFILED_OPS)
                    for op in steps[-1]["ops"][:PRINTED_OPS]:
                        print(f"    {op['share']:6.1%}  {op['op']}", flush=True)
            return (
                measured,
                speed.linear_fit([(m.filled, m.step_seconds) for m in measured]),
                speed.linear_fit([(m.filled, m.bytes_per_step) for m in measured]),
            )

        for kv_cache, (transformer, _) in variants.items():
            for method in FLAGS.methods:
                # A K-only cache keeps one token set per layer; preset models get random statistics.
                settings = PolicySettings(
                    budget=FLAGS.budget,
                    stats=FLAGS.stats,
                    aggregation="per_layer" if transformer.slim else None,
                    slack_trigger=FLAGS.slack_trigger,
                )
                policy = build_policy(
                    loaded or transformer,
                    method,
                    settings,
                    stats=random_calibration(transformer) if loaded is None else None,
                    fit=random_fit(transformer) if loaded is None else None,
                )
                memory = speed.sequence_memory(transformer, policy, P, N, divide, mesh=mesh)
                run_batches = [(b, False) for b in batches]
                if FLAGS.largest_batch and memory_limit:
                    largest = speed.largest_batch(
                        memory_limit, speed.weight_bytes(transformer), memory, FLAGS.memory_reserve, mesh=mesh
                    )
                    print(
                        f"{method} ({kv_cache}): largest batch {largest} (KV {memory.buffer / 2**20:.1f} MiB and "
                        f"scratch {memory.scratch / 2**20:.1f} MiB per sequence)",
                        flush=True,
                    )
                    run_batches.append((largest, True))
                for batch, is_largest in run_batches:
                    if batch < 1:
                        print(f"{method}: no batch fits in {memory_limit / 2**30:.1f} GiB", file=sys.stderr)
                        continue
                    measured, fit, fit_bytes = timed(transformer, policy, method, kv_cache, batch, mesh)
                    seconds = speed.integrated(fit, policy, P, N, divide)
                    hf = hf_seconds.get(batch, {}) if method == "full" else {}
                    row = {
                        "method": method,
                        "kv_cache": kv_cache,
                        **placement(mesh),
                        "batch": batch,
                        "largest_batch": is_largest,
                        "prompt_tokens": P,
                        "new_tokens": N,
                        "weight_bytes": speed.weight_bytes(transformer),
                        "kv_bytes_per_sequence": memory.buffer,
                        "kv_mib_per_sequence": memory.buffer / 2**20,
                        "scratch_bytes_per_sequence": memory.scratch,
                        "fixed_scratch_bytes": memory.fixed_scratch,
                        "integrated_seconds": seconds,
                        "tokens_per_second": batch * N / seconds,
                        "roofline_fraction": speed.integrated(fit_bytes, policy, P, N, divide) / seconds / bandwidth,
                        "final_roofline_fraction": step_row(measured[-1], bandwidth)["roofline_fraction"],
                        "eviction_share": measured[-1].eviction_share,
                        "collective_share": measured[0].collective_share,
                        **{
                            f"hf_{mode}_tokens_per_second": batch / hf[mode] if mode in hf else None
                            for mode in HF_MODES
                        },
                    }
                    if FLAGS.e2e_tokens and batch == run_batches[0][0] and not is_largest:
                        e2e = speed.end_to_end(
                            transformer,
                            policy,
                            batch=batch,
                            prompt_tokens=P,
                            new_tokens=FLAGS.e2e_tokens,
                            divide_length=divide,
                            mesh=mesh,
                        )
                        predicted = sum(divide * fit(fill) for fill in e2e["steady_round_fills"])
                        row.update(
                            e2e=e2e,
                            e2e_tokens_per_second=e2e["steady_tokens_per_second"],
                            e2e_predicted_tokens_per_second=batch * divide * e2e["steady_rounds"] / predicted
                            if predicted
                            else None,
                        )
                    runs.append(row)
                    print(format_rows(runs[-1:], RUN_COLUMNS).splitlines()[-1], flush=True)
                    save()
    _, peak = speed.device_memory()
    print(
        f"\n{environment()['device']}: roofline {bandwidth / 1e9:.0f} GB/s ({roofline['roofline_source']}; copy "
        f"{roofline['copy_bytes_per_second'] / 1e9:.0f}, read {roofline['read_bytes_per_second'] / 1e9:.0f} GB/s "
        f"over {roofline['size']}), weights {weights[0] / 1e9:.2f} GB per device, "
        f"peak memory {peak / 2**30 if peak else float('nan'):.1f} GiB of "
        f"{memory_limit / 2**30 if memory_limit else float('nan'):.1f}"
    )
    print("\nsteady decode steps\n" + format_rows(steps, STEP_COLUMNS))
    print(f"\n{N} tokens after a {P}-token prompt\n" + format_rows(runs, RUN_COLUMNS))
    if len(counts) > 1:
        print(
            "\nscaling over devices (each method at its largest batch)\n"
            + format_rows(scaling_rows(runs), SCALING_COLUMNS)
        )
    save()


_BENCHMARK_FLAGS = (
    "model",
    "preset",
    "dtype",
    "batch",
    "methods",
    "prompt_tokens",
    "new_tokens",
    "cache_lengths",
    "budget",
    "slack_trigger",
    "divide_length",
    "e2e_tokens",
    "largest_batch",
    "memory_reserve",
    "stats",
    "kv_cache",
    "slim_value_map",
    "hf",
    "mesh",
    "devices",
    "profile",
)


if __name__ == "__main__":
    run_cli(main)
