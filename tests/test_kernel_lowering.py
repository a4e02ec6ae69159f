"""The Pallas kernels lower for CUDA on this CPU, at the Llama-2-7B decode shape and with each
tuning option, so a kernel change that Triton or Mosaic GPU cannot take fails here rather than
in device time. (Interpret mode, which the other kernel tests run, does not lower to Triton;
the one-read kernel has no interpret mode.) Compiling to a GPU binary needs a GPU: how long
that takes is not checked."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from triattention_jax.kernels.decode_attention import decode_attention
from triattention_jax.kernels.key_only_attention import key_only_attention
from triattention_jax.kernels.key_only_one_read import key_only_one_read

B, S, H, HD = 8, 2176, 32, 128
TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_GPU_CALL = "stablehlo.custom_call @mosaic_gpu_v2"


def _lowered_for_cuda(traced_function) -> str:
    # The kernels choose interpret mode from the default backend; lowering for CUDA needs the
    # compiled form.
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        return traced_function().lower(lowering_platforms=("cuda",)).as_text()


def _layer_inputs(batch: int = B, slots: int = S, heads: int = H):
    return (
        jax.ShapeDtypeStruct((batch, heads, HD), jnp.float32),
        jax.ShapeDtypeStruct((batch, slots, heads, HD), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch, slots), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )


ROPE = dict(
    inv_freq=tuple(float(10000.0 ** (-2 * i / HD)) for i in range(HD // 2)), attention_scaling=1.0, scale=HD**-0.5
)


@pytest.mark.parametrize(
    "options",
    [{}, {"score_heads": 4}, {"unroll_heads": 4}, {"score_heads": 8, "unroll_heads": 8, "num_warps": 8}],
)
def test_key_only_kernels_lower_to_triton(options):
    text = _lowered_for_cuda(lambda: key_only_attention.trace(*_layer_inputs(), **ROPE, **options))
    assert text.count(TRITON_CALL) == 2  # the scores and the sums kernels


@pytest.mark.parametrize("batch, heads, splits", [(B, H, 1), (B, H, 4), (2, 16, None), (3, 32, 2)])
def test_one_read_kernel_lowers_to_mosaic_gpu(batch, heads, splits):
    inputs = _layer_inputs(batch, S, heads)
    text = (
        jax.jit(key_only_one_read, static_argnames=tuple(ROPE) + ("splits",))
        .trace(*inputs, **ROPE, splits=splits)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert text.count(MOSAIC_GPU_CALL) == 1  # one kernel: each key read once
    assert TRITON_CALL not in text


def test_decode_kernel_lowers_to_triton():
    kv = jax.ShapeDtypeStruct((B, 8, S, HD), jnp.bfloat16)
    text = _lowered_for_cuda(
        lambda: decode_attention.trace(
            jax.ShapeDtypeStruct((B, 8, 4, HD), jnp.bfloat16),
            kv,
            kv,
            jax.ShapeDtypeStruct((B, 8, S), jnp.int32),
            jax.ShapeDtypeStruct((B,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32),
            scale=HD**-0.5,
        )
    )
    assert text.count(TRITON_CALL) == 1
