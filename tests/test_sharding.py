"""Decoding on a mesh of 8 virtual CPU devices: the same tokens as one device, the cache laid
out by batch and KV heads, eviction without gathering the cache, and one clear line for bad meshes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, WIDE, random_transformer
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from triattention_jax import sharding
from triattention_jax.bench.presets import random_stats
from triattention_jax.bench.report import scaling_rows
from triattention_jax.cache import KVCache, cache_nbytes
from triattention_jax.config import ModelConfig
from triattention_jax.decoding import DecodeState, decode_round, generate, prefill, teacher_force
from triattention_jax.errors import UserError
from triattention_jax.model import Transformer, weight_specs
from triattention_jax.policies import FullAttention, TriAttention
from triattention_jax.policies.snapkv import SnapKV
from triattention_jax.sampling import Sampler


@pytest.fixture(scope="module")
def transformer():
    return random_transformer(WIDE)


def _policy(name: str, transformer: Transformer):
    if name == "full":
        return FullAttention()
    return TriAttention.create(transformer, random_stats(transformer, seed=1), budget=32)


def _prompts(vocab: int, lengths=(5, 19, 11, 24)) -> list[list[int]]:
    rng = np.random.default_rng(2)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


_reference: dict[str, list[list[int]]] = {}


@pytest.mark.parametrize(
    "method, spec",
    [
        ("full", "data=4,model=2"),
        ("full", "data=2,model=4"),
        ("triattention", "data=2,model=4"),
        ("triattention", "data=4,model=2"),
    ],
)
def test_sharded_decoding_gives_the_tokens_of_one_device(transformer, method, spec):
    """float32, greedy, four prompts of different lengths, three rounds (TriAttention, budget
    32, compacts at prefill and before the second and third)."""
    policy = _policy(method, transformer)
    prompts = _prompts(transformer.config.vocab_size)
    options = dict(eos_ids=(), max_new_tokens=48, divide_length=16, policy=policy)
    if method not in _reference:
        _reference[method] = generate(transformer, prompts, **options).token_ids
    mesh = sharding.make_mesh(spec)
    sharded = generate(sharding.shard_transformer(transformer, mesh), prompts, mesh=mesh, **options)
    assert sharded.token_ids == _reference[method]


_TWO_HOST_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from triattention_jax import sharding
sharding.initialize_distributed()
import test_sharding as t
from triattention_jax.decoding import generate
transformer = t.random_transformer(t.WIDE)
result = generate(transformer, t._prompts(transformer.config.vocab_size), eos_ids=(), max_new_tokens=48,
                  divide_length=16, policy=t._policy("triattention", transformer),
                  mesh=sharding.make_mesh("data=2,model=4"))
print(json.dumps(result.token_ids))
"""


@pytest.mark.slow
def test_two_processes_decode_as_one_mesh(transformer):
    """Two processes of four CPU devices each, joined by `initialize_distributed` from the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment: each holds half
    the rows and reads the whole batch's tokens back (multi-host decoding on one machine)."""
    import json
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_HOST_CHILD, str(REPO_ROOT / "tests")],
            cwd=REPO_ROOT,
            env={**env, "JAX_PROCESS_ID": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (_, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr[-3000:]
    if "triattention" not in _reference:
        _reference["triattention"] = generate(
            transformer,
            _prompts(transformer.config.vocab_size),
            eos_ids=(),
            max_new_tokens=48,
            divide_length=16,
            policy=_policy("triattention", transformer),
        ).token_ids
    for stdout, _ in outputs:
        assert json.loads(stdout.strip().splitlines()[-1]) == _reference["triattention"]


def test_sharded_teacher_forcing_matches_one_device(transformer):
    tokens = np.array(_prompts(transformer.config.vocab_size, lengths=(40, 40)))
    policy = _policy("triattention", transformer)
    single = teacher_force(transformer, tokens, prefill_length=8, policy=policy, divide_length=16)
    mesh = sharding.make_mesh("data=2,model=4")
    sharded = teacher_force(transformer, tokens, prefill_length=8, policy=policy, divide_length=16, mesh=mesh)
    np.testing.assert_allclose(sharded, single, atol=2e-5)


def _prefilled(transformer: Transformer, policy, mesh, batch: int = 4):
    graphdef, state = nnx.split(sharding.shard_transformer(transformer, mesh))
    tokens = sharding.put_batch(np.ones((batch, 64), np.int32), mesh)
    lengths = sharding.put_batch(np.full(batch, 40, np.int32), mesh)
    _, cache = prefill(graphdef, state, policy, tokens, lengths, num_slots=64 + 16, mesh=mesh)
    return graphdef, state, cache, lengths


def _laid_out(array: jax.Array, mesh, *spec) -> bool:
    return array.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), array.ndim)


def test_cache_is_laid_out_by_batch_and_kv_heads(transformer):
    mesh = sharding.make_mesh("data=2,model=4")
    policy = SnapKV(budget=48)
    graphdef, state, cache, lengths = _prefilled(transformer, policy, mesh)
    decode = DecodeState(
        token=sharding.put_batch(np.ones(4, np.int32), mesh),
        position=lengths,
        done=sharding.put_batch(np.zeros(4, bool), mesh),
        step=jnp.zeros((), jnp.int32),
    )
    cache, _, _ = decode_round(
        graphdef,
        state,
        policy,
        cache,
        decode,
        lengths,
        jax.random.key(0),
        jnp.asarray([-2], jnp.int32),
        sampler=Sampler(),
        divide_length=16,
        mesh=mesh,
    )
    for layer in range(transformer.config.num_layers):
        assert _laid_out(cache.k[layer], mesh, "data", "model", None, None)
        assert _laid_out(cache.v[layer], mesh, "data", "model", None, None)
        assert _laid_out(cache.pos[layer], mesh, "data", "model", None)
    assert _laid_out(cache.state["window_queries"], mesh, None, "data", None, "model", None)
    assert _laid_out(cache.state["window_positions"], mesh, "data", None)
    assert _laid_out(cache.cursor, mesh)
    assert cache.k[0].addressable_shards[0].data.shape == (
        4 // mesh.shape["data"],
        4 // mesh.shape["model"],
        cache.num_slots,
        8,
    )


def test_weights_follow_the_logical_axis_rules(transformer):
    mesh = sharding.make_mesh("data=2,model=4")
    layer = sharding.shard_transformer(transformer, mesh).layers[0]
    assert _laid_out(layer.wq.get_value(), mesh, None, "model", None)
    assert _laid_out(layer.wk.get_value(), mesh, None, "model", None)
    assert _laid_out(layer.wo.get_value(), mesh, "model", None, None)
    assert _laid_out(layer.w_up.get_value(), mesh, None, "model")
    assert _laid_out(layer.w_down.get_value(), mesh, "model", None)
    assert _laid_out(layer.q_norm.get_value(), mesh, None)
    assert layer.wq.get_value().addressable_shards[0].data.shape == (64, 2, 8)


_COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(")


def _collective_shapes(hlo: str) -> list[str]:
    return [match.group(1) for match in _COLLECTIVE.finditer(hlo)]


def _round_collectives(transformer: Transformer, policy, mesh) -> tuple[KVCache, list[str]]:
    """The prefilled cache and the shapes of the collectives in a compiled 16-step round on it."""
    graphdef, state, cache, lengths = _prefilled(transformer, policy, mesh)
    decode = DecodeState(
        token=sharding.put_batch(np.ones(4, np.int32), mesh),
        position=lengths,
        done=sharding.put_batch(np.zeros(4, bool), mesh),
        step=jnp.zeros((), jnp.int32),
    )
    args = (graphdef, state, policy, cache, decode, lengths, jax.random.key(0), jnp.asarray([-2], jnp.int32))
    lowered = decode_round.lower(*args, sampler=Sampler(), divide_length=16, mesh=mesh)
    return cache, _collective_shapes(lowered.compile().as_text())


def test_decode_round_with_eviction_never_moves_cache_entries(transformer):
    """The whole round (compaction with per_head aggregation, then 16 steps) on a cache split
    by rows and KV heads: the collectives are those of tensor parallelism (activations,
    logits); none carries K or V entries, whose shapes end in (slots, head_dim), nor per-slot
    scores or positions (ending in slots): eviction stays on its shard."""
    mesh = sharding.make_mesh("data=2,model=4")
    policy = TriAttention.create(transformer, random_stats(transformer), budget=64)
    cache, shapes = _round_collectives(transformer, policy, mesh)
    assert shapes, "tensor parallelism needs collectives: the HLO pattern no longer matches"
    slots, head_dim = cache.num_slots, transformer.config.head_dim
    per_slot = [s for s in shapes if re.search(rf"\b{slots}(,{head_dim})?\]", s)]
    assert per_slot == []


def test_benchmark_step_on_a_mesh_counts_one_devices_bytes(transformer):
    """`benchmark --mesh` times rounds on the mesh; a device streams its weight shards (heads,
    MLP and vocabulary split four ways) and its rows' and heads' K, V and positions of the slots
    in use (the round compacts to the budget of 64, then fills 16 more: 64 + 7.5 on average)."""
    from triattention_jax.bench.speed import measure_steps

    mesh = sharding.make_mesh("data=2,model=4")
    policy = TriAttention.create(transformer, random_stats(transformer), budget=64)
    (step,) = measure_steps(
        transformer, policy, "triattention", batch=4, slots=80, fills=[80], divide_length=16, mesh=mesh
    )
    split = {"vocab", "q_heads", "kv_heads", "mlp"}
    weights = sum(
        4 * int(np.prod(shape)) // (4 if split & set(axes) else 1)
        for shape, axes in weight_specs(transformer.config).values()
    )
    config = transformer.config
    slot = config.num_layers * (4 // 2) * (config.num_kv_heads // 4) * (2 * config.head_dim * 4 + 4)
    assert step.bytes_per_step == pytest.approx(weights + slot * (64 + 7.5), abs=1)
    assert step.step_seconds > 0 and 0 <= step.eviction_share < 1
    # Tensor parallel: every layer all-reduces its attention and MLP outputs over the model axis.
    assert 0 < step.collective_share < 1


def test_largest_batch_on_a_mesh_sizes_one_devices_memory(transformer):
    """On data=2,model=4 a device holds a quarter of each of its rows' KV heads and a quarter
    of the split weights; as many rows fit on each data shard, so the batch doubles."""
    from triattention_jax.bench.speed import largest_batch, sequence_memory, weight_bytes

    mesh = sharding.make_mesh("data=2,model=4")
    policy = FullAttention()
    one = sequence_memory(transformer, policy, 64, 64, 16)
    sharded = sequence_memory(transformer, policy, 64, 64, 16, mesh=mesh)
    assert sharded.buffer == pytest.approx(one.buffer / 4, abs=1)
    weights = weight_bytes(sharding.shard_transformer(transformer, mesh))
    assert weights < weight_bytes(transformer) / 2
    memory = weights + sharded.fixed_scratch + 10 * (sharded.buffer + sharded.scratch)
    assert largest_batch(memory, weights, sharded, reserve=0.0, mesh=mesh) == 20
    assert largest_batch(memory - 1, weights, sharded, reserve=0.0, mesh=mesh) == 18


def test_mesh_spec_parsing():
    assert sharding.parse_mesh_spec("data=2,model=4") == {"data": 2, "model": 4}
    assert sharding.parse_mesh_spec(" model = 2 ") == {"data": 1, "model": 2}
    mesh = sharding.make_mesh("data=2")
    assert dict(mesh.shape) == {"data": 2, "model": 1} and mesh.devices.size == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=2,pipeline=2", "unknown axis 'pipeline'"),
        ("data=2,data=2", "axis 'data' is given twice"),
        ("data=two", "must be a positive integer"),
        ("model=0", "must be a positive integer"),
        ("data", "expected comma-separated axis=size entries"),
        ("data=3", "needs 3 devices, which does not divide the 8 devices"),
        ("data=4,model=4", "needs 16 devices, more than the 8"),
    ],
)
def test_bad_mesh_specs(spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        sharding.make_mesh(spec)


def test_model_and_batch_that_do_not_fit_the_mesh(transformer):
    with pytest.raises(
        UserError, match="model axis of 8 does not divide the model's 4 KV heads: .* \\(here: 1, 2, 4\\)"
    ):
        sharding.check_model_fits(transformer.config, sharding.make_mesh("model=8"))
    six_heads = ModelConfig.from_hf({**WIDE, "num_attention_heads": 6, "num_key_value_heads": 6})
    with pytest.raises(UserError, match="model axis of 4 does not divide the model's 6 KV heads: .* \\(here: 1, 2\\)"):
        sharding.check_model_fits(six_heads, sharding.make_mesh("model=4"))
    narrow = ModelConfig.from_hf({**WIDE, "intermediate_size": 130})
    with pytest.raises(UserError, match="does not divide the model's 130 MLP hidden units"):
        sharding.check_model_fits(narrow, sharding.make_mesh("model=4"))
    with pytest.raises(UserError, match="a batch of 3 rows does not split over the mesh's data axis of 2"):
        generate(
            transformer,
            _prompts(256, lengths=(3, 4, 5)),
            eos_ids=(),
            max_new_tokens=4,
            mesh=sharding.make_mesh("data=2"),
        )


def _decode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "decode.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--mesh", "data=2,tensor=4"], "unknown axis 'tensor'"),
        (["--prompt", "x", "--mesh", "data=2"], "a batch of 1 rows does not split over the mesh's data axis of 2"),
        (["--prompt", "x", "--mesh", "model=2"], "does not divide the model's 3 KV heads"),
    ],
)
def test_decode_cli_mesh_errors(args, message):
    result = _decode(*args)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


def test_weight_bytes_per_device_from_the_config(transformer):
    from triattention_jax.bench.speed import weight_bytes

    for spec in ("data=8", "data=2,model=4", "model=2"):
        mesh = sharding.make_mesh(spec)
        placed = weight_bytes(sharding.shard_transformer(transformer, mesh))
        assert sharding.device_weight_bytes(transformer.config, transformer.dtype, dict(mesh.shape)) == placed


def test_automatic_mesh_prefers_replicas_that_fit(transformer):
    """8 devices, 4 KV heads: every device in use, replicas wherever the batch splits and the
    weights fit, tensor parallel within them for the rest (one row: latency) and where a
    replica's weights and rows exceed a device."""
    config, dtype = transformer.config, transformer.dtype

    def choose(batches, memory, slots=64):
        return sharding.choose_mesh(
            config, dtype, devices=8, batches=batches, num_slots=slots, memory_bytes=memory, reserve=0.0
        )

    assert choose([8], None) == {"data": 8, "model": 1}
    assert choose([8, 16], None) == {"data": 8, "model": 1}
    assert choose([2], None) == {"data": 2, "model": 4}
    assert choose([1], None) == {"data": 1, "model": 4}
    whole = sharding.device_weight_bytes(config, dtype, {"data": 1, "model": 1})
    half = sharding.device_weight_bytes(config, dtype, {"data": 1, "model": 2})
    row = cache_nbytes(config, 1, 64, dtype)
    assert choose([8], whole + row) == {"data": 8, "model": 1}
    assert choose([8], whole + row - 1) == {"data": 4, "model": 2}
    assert choose([8], half + row) == {"data": 4, "model": 2}
    smallest = r"no mesh of 8 devices fits 9.31e-07 GiB per device: the smallest share, data=2,model=4, needs "
    with pytest.raises(UserError, match=smallest + r".*use more devices"):
        choose([8], 1000)
    # 3 KV heads and one row: no model axis divides both the heads and the 8 devices.
    three_heads = ModelConfig.from_hf({**WIDE, "num_attention_heads": 6, "num_key_value_heads": 3})
    assert sharding.choose_mesh(three_heads, dtype, devices=8, batches=[1], num_slots=64, memory_bytes=None) == {
        "data": 1,
        "model": 1,
    }


def test_decode_cli_automatic_mesh(tmp_path):
    """Two prompts over 8 devices and SmolLM2's 3 KV heads: two replicas."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nName a primary color.\n")
    result = _decode(
        "--prompt_file",
        str(prompts),
        "--mesh",
        "auto",
        "--max_new_tokens",
        "8",
        "--dtype",
        "float32",
    )
    assert result.returncode == 0, result.stderr
    assert "--mesh auto: data=2,model=1" in result.stderr


def test_benchmark_scales_over_device_counts(tmp_path):
    """--devices 1,2: one device without a mesh, then the mesh --mesh auto picks over two (two
    replicas of the tiny model), and a scaling table against the one-device rate."""
    out = tmp_path / "scaling.json"
    result = subprocess.run(
        [sys.executable, "-m", "triattention_jax.cli.benchmark", "--preset", "tiny", "--methods", "full,triattention"]
        + ["--budget", "64", "--batch", "4", "--prompt_tokens", "32", "--new_tokens", "96", "--e2e_tokens", "0"]
        + ["--nohf", "--dtype", "float32", "--devices", "1,2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "2 devices: mesh data=2,model=1" in result.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [(r["method"], r["devices"], r["mesh"]) for r in runs] == [
        ("full", 1, None),
        ("triattention", 1, None),
        ("full", 2, "data=2,model=1"),
        ("triattention", 2, "data=2,model=1"),
    ]
    table = scaling_rows(runs)
    assert [(r["method"], r["devices"]) for r in table] == [
        ("full", 1),
        ("full", 2),
        ("triattention", 1),
        ("triattention", 2),
    ]
    # Replicas decode their rows without a collective; one device has nothing to measure.
    for one, two in (table[:2], table[2:]):
        assert one["collective_share"] is None and two["collective_share"] == 0.0
        assert one["speed_up"] == 1.0
        assert two["speed_up"] == pytest.approx(two["tokens_per_second"] / one["tokens_per_second"])
    assert "scaling over devices" in result.stdout


def test_scaling_rows_take_each_device_counts_largest_batch():
    def run(devices, batch, largest, rate):
        return dict(
            method="full",
            kv_cache="standard",
            devices=devices,
            batch=batch,
            largest_batch=largest,
            tokens_per_second=rate,
        )

    table = scaling_rows(
        [
            run(1, 8, False, 100.0),
            run(1, 20, True, 150.0),
            run(2, 8, False, 180.0),
            run(2, 40, True, 300.0),
            run(4, 8, False, 330.0),
        ]
    )
    assert [(r["devices"], r["batch"], r["speed_up"]) for r in table] == [(1, 20, 1.0), (2, 40, 2.0), (4, 8, 2.2)]


def test_slim_cache_on_a_mesh_moves_probabilities_not_keys():
    """A K-only cache split by rows and heads: the single-device tokens, and in the compiled
    round no collective as large as a device's share of one layer's keys. Each value needs
    every head's keys, so a device combines all heads' probabilities (gathered: one float per
    head and slot) with its own key features and rows of W_KV; XLA had gathered every K."""
    from test_decode_attention import MHA

    from triattention_jax.slim import slim_transformer

    slim = slim_transformer(random_transformer(MHA))[0]
    prompts = _prompts(256)
    # TriAttention keeps one token set per layer (per_layer: the max over heads, across devices).
    evicting = TriAttention.create(slim, random_stats(slim, seed=1), budget=32, aggregation="per_layer")
    for policy, spec in ((FullAttention(), "data=2,model=2"), (evicting, "data=2,model=2")):
        single = generate(slim, prompts, eos_ids=(), max_new_tokens=24, divide_length=8, policy=policy).token_ids
        mesh = sharding.make_mesh(spec)
        sharded = generate(slim, prompts, eos_ids=(), max_new_tokens=24, divide_length=8, policy=policy, mesh=mesh)
        assert sharded.token_ids == single
    mesh = sharding.make_mesh("model=4")
    policy = FullAttention()
    cache, shapes = _round_collectives(slim, policy, mesh)
    config = slim.config
    local_keys = 4 * cache.num_slots * config.num_kv_heads // 4 * config.head_dim
    sizes = [int(np.prod([int(d) for d in re.findall(r"\d+", s.split("[")[1].split("]")[0])])) for s in shapes]
    assert shapes and max(sizes) < local_keys, list(zip(shapes, sizes))
