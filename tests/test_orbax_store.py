"""orbax checkpoints: bit-exact round trips, restores into a mesh's shardings, statistics, atomic writes."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from triattention_jax import sharding
from triattention_jax.bench.presets import random_stats
from triattention_jax.bench.reload import time_reload
from triattention_jax.calibration import stats_for_model
from triattention_jax.checkpoints import orbax as orbax_store
from triattention_jax.checkpoints.hf import load_transformer
from triattention_jax.checkpoints.stats import STAT_NAMES, CalibrationResult, model_metadata
from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.errors import UserError


def _flat(transformer) -> dict:
    return {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(transformer))}


@pytest.fixture(scope="module")
def saved(tiny_model_dirs, tmp_path_factory):
    """qwen2 (biases, untied head) in float32 with statistics, as an orbax checkpoint."""
    source = tiny_model_dirs["qwen2-untied"]
    transformer = load_transformer(source, dtype="float32")
    c = transformer.config
    band_var = np.random.default_rng(3).uniform(0.1, 2.0, (c.num_layers, c.num_heads, c.head_dim // 2))
    stats = CalibrationResult(
        stats=random_stats(transformer, seed=3),
        metadata={**model_metadata(transformer), "num_tokens": 7},
        q_band_var=band_var.astype(np.float32),
    )
    out = orbax_store.save_orbax(transformer, source, tmp_path_factory.mktemp("orbax") / "qwen2", stats=stats)
    return transformer, stats, out


def test_round_trip_is_bit_exact_with_statistics(saved):
    transformer, stats, out = saved
    assert orbax_store.is_orbax_checkpoint(out)
    assert (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    restored, restored_stats = orbax_store.restore_transformer(out)
    assert restored.config == transformer.config and restored.dtype == transformer.dtype
    expected, found = _flat(transformer), _flat(restored)
    assert expected.keys() == found.keys()
    for path, value in expected.items():
        assert found[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(found[path]), np.asarray(value), err_msg=str(path))
    for name in STAT_NAMES:
        np.testing.assert_array_equal(
            np.asarray(getattr(restored_stats.stats, name)), np.asarray(getattr(stats.stats, name))
        )
    np.testing.assert_array_equal(restored_stats.q_band_var, stats.q_band_var)
    assert restored_stats.metadata == stats.metadata


@pytest.mark.parametrize("spec", ["data=4,model=2", "data=8"])
def test_restores_into_the_mesh_shardings(saved, spec):
    transformer, _, out = saved
    mesh = sharding.make_mesh(spec)
    restored, stats = orbax_store.restore_transformer(out, mesh=mesh)
    expected = _flat(transformer)
    for path, variable in nnx.to_flat_state(nnx.state(restored)):
        value = variable.get_value()
        assert value.sharding == sharding.variable_sharding(variable, mesh), path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]))
    layer = restored.layers[0]
    model = mesh.shape["model"]
    split = "model" if model > 1 else None
    assert layer.wq.get_value().sharding.spec == jax.sharding.PartitionSpec(None, split, None)
    assert layer.w_down.get_value().sharding.spec == jax.sharding.PartitionSpec(split, None)
    assert layer.wk.get_value().sharding.spec == jax.sharding.PartitionSpec(None, split, None)
    assert restored.lm_head.get_value().sharding.spec == jax.sharding.PartitionSpec(None, split)
    assert layer.wq.get_value().addressable_shards[0].data.shape == (64, 4 // model, 16)
    assert stats.stats.q_mean_real.sharding.is_fully_replicated


def test_restore_casts_to_the_requested_dtype(saved):
    transformer, _, out = saved
    restored, _ = orbax_store.restore_transformer(out, dtype="bfloat16")
    assert restored.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(
        np.asarray(restored.layers[1].wq.get_value()),
        np.asarray(transformer.layers[1].wq.get_value()).astype(restored.dtype),
    )


def test_statistics_travel_with_the_checkpoint(saved):
    transformer, stats, out = saved
    restored, restored_stats = orbax_store.restore_transformer(out)
    model = LoadedModel(
        config=restored.config, transformer=restored, tokenizer=None, path=out, name="orbax-test", stats=restored_stats
    )
    assert stats_for_model(model, None) is restored_stats


def test_save_refuses_an_existing_folder_and_leaves_no_temporary(saved, tmp_path):
    transformer, _, out = saved
    with pytest.raises(UserError, match="already exists"):
        orbax_store.save_orbax(transformer, out, out)
    target = tmp_path / "fresh"
    orbax_store.save_orbax(transformer, out, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]
    assert json.loads((target / orbax_store.MARKER).read_text())["stats"] is None
    assert orbax_store.restore_transformer(target)[1] is None


def test_damaged_marker_is_a_user_error(saved, tmp_path):
    transformer, _, out = saved
    target = orbax_store.save_orbax(transformer, out, tmp_path / "damaged")
    (target / orbax_store.MARKER).write_text("{")
    with pytest.raises(UserError, match="damaged"):
        orbax_store.restore_transformer(target)


def test_model_axis_that_does_not_divide_the_heads_is_refused(saved):
    with pytest.raises(UserError, match="does not divide the model's 2 KV heads"):
        orbax_store.restore_transformer(saved[2], mesh=sharding.make_mesh("model=8"))


def test_decode_reads_an_orbax_checkpoint_on_a_mesh_with_its_statistics(saved, tmp_path, monkeypatch):
    """What `decode.py --model <orbax folder> --mesh ... --method triattention` runs: the folder is
    recognised, restored onto the mesh, and TriAttention takes the statistics saved in it (it
    would otherwise calibrate and write them to the model store)."""
    from triattention_jax.checkpoints.store import resolve_model_dir
    from triattention_jax.methods import PolicySettings
    from triattention_jax.pipeline import DecodeRequest, decode_prompts

    _, _, out = saved
    source = tmp_path / "with-tokenizer"
    shutil.copytree(out, source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_dir("smollm2-135m-instruct") / name, source / name)
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("TRIATTENTION_MODELS", str(store))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\nfour five six seven\n")
    request = DecodeRequest(
        model=str(source),
        prompt=None,
        prompt_file=str(prompts),
        chat=False,
        max_new_tokens=20,
        ignore_eos=True,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        dtype="float32",
        method="triattention",
        divide_length=8,
        kv_cache="standard",
        slim_max_cond=None,
        slim_value_map="auto",
        output_json=None,
        mesh="data=2,model=2",
    )
    report = decode_prompts(request, PolicySettings(budget=16))
    assert report["mesh"] == "data=2,model=2"
    assert report["num_generated_tokens"] == [20, 20]
    assert list(store.iterdir()) == []


def test_time_reload_reports_both_sources(tiny_model_dirs):
    result = time_reload(
        str(tiny_model_dirs["llama-tied"]), dtype="float32", repeats=1, mesh=sharding.make_mesh("data=2,model=2")
    )
    assert [row["source"] for row in result["rows"]] == ["safetensors", "orbax"]
    assert all(len(times) == 1 and min(times) > 0 for times in result["seconds"].values())
    assert result["mesh"] == "data=2,model=2"
    assert not list(tiny_model_dirs["llama-tied"].parent.glob(".orbax-reload-*"))
