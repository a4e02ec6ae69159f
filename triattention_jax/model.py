"""The Llama / Qwen2 / Qwen3 decoder as an NNX module holding its weights per layer.

The module only holds weights. `Transformer.extend` is a pure function of the weights, a
`KVCache` and new tokens: split the module once with `nnx.split`, and jit a function of
(graphdef, state, cache). Every weight carries its logical axis names (sharding rules).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from triattention_jax.cache import CacheLayer, KVCache
from triattention_jax.config import ModelConfig
from triattention_jax.kernels import decode_attention, key_only_attention, key_only_one_read
from triattention_jax.kernels.decode_attention import MASK_VALUE
from triattention_jax.rope import apply_rope, inverse_frequencies, rope_cos_sin


def weight_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every weight's shape and logical axis names, keyed by our weight name."""
    L, D, F, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    H, K, hd = config.num_heads, config.num_kv_heads, config.head_dim
    specs = {
        "embed": ((V, D), ("vocab", "embed")),
        "final_norm": ((D,), ("embed",)),
        "attn_norm": ((L, D), ("layers", "embed")),
        "wq": ((L, D, H, hd), ("layers", "embed", "q_heads", "head_dim")),
        "wk": ((L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": ((L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": ((L, H, hd, D), ("layers", "q_heads", "head_dim", "embed")),
        "mlp_norm": ((L, D), ("layers", "embed")),
        "w_gate": ((L, D, F), ("layers", "embed", "mlp")),
        "w_up": ((L, D, F), ("layers", "embed", "mlp")),
        "w_down": ((L, F, D), ("layers", "mlp", "embed")),
    }
    if not config.tie_word_embeddings:
        specs["lm_head"] = ((D, V), ("embed", "vocab"))
    if config.qkv_bias:
        specs["bq"] = ((L, H, hd), ("layers", "q_heads", "head_dim"))
        specs["bk"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
        specs["bv"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
    if config.o_bias:
        specs["bo"] = ((L, D), ("layers", "embed"))
    if config.qk_norm:
        specs["q_norm"] = ((L, hd), ("layers", "head_dim"))
        specs["k_norm"] = ((L, hd), ("layers", "head_dim"))
    return specs


LAYER_WEIGHTS = frozenset(
    [
        "attn_norm",
        "wq",
        "wk",
        "wv",
        "wo",
        "mlp_norm",
        "w_gate",
        "w_up",
        "w_down",
        "bq",
        "bk",
        "bv",
        "bo",
        "q_norm",
        "k_norm",
        "w_kv",
    ]
)
# Not in checkpoints: W_KV = W_K^{-1} W_V, added by `slim.slim_transformer`, head-major
# (kv_heads, D, head_dim) so the per-head product of every step reads it as stored. Its rows
# are all heads' key features: split like the cached keys on a mesh (`key_only_block`).
SLIM_AXES = ("value_heads", "key_features", "head_dim")
# Pins an intermediate array's layout by its logical axis names (None: replicated); on a mesh
# `sharding.pinner`.
Pin = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExtendOutput:
    """logits: float32 (batch, V) or (batch, T, V); k, v: per layer (batch, kv_heads, T, head_dim),
    post-RoPE, as the cache stores them, ready for `KVCache.append` (a K-only layer's keys
    are pre-RoPE and slot-major, (batch, T, kv_heads, head_dim)). When collected (else None):
    queries (layers, batch, T, heads, head_dim) and keys (layers, batch, T, kv_heads, head_dim), float32 pre-RoPE;
    rope_queries, the post-RoPE queries; attention_cache (layers, batch, kv_heads, slots) and
    attention_new (layers, batch, kv_heads, T), the attention each cache slot and each new key
    received, summed over the queries of its GQA group."""

    logits: jax.Array
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    queries: jax.Array | None = None
    keys: jax.Array | None = None
    rope_queries: jax.Array | None = None
    attention_cache: jax.Array | None = None
    attention_new: jax.Array | None = None


class LayerWeights(nnx.Module):
    """One decoder layer's weights, each an `nnx.Param` with its logical axes (no layer axis)."""

    def __init__(self, weights: Mapping[str, jax.Array], axes: Mapping[str, tuple[str, ...]]):
        for name, value in weights.items():
            setattr(self, name, nnx.Param(value, logical_axes=axes[name]))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in LAYER_WEIGHTS if hasattr(self, name)}


class Transformer(nnx.Module):
    """Weights of a decoder; every weight is an `nnx.Param` carrying its `logical_axes`.

    Built from layer-stacked arrays (as `weight_specs` names them, what converters produce)
    or, for layer weights, lists of per-layer arrays; held as one `LayerWeights` per layer, so a
    decode loop reads each layer's weights in place: XLA copies every slice a loop body takes
    from a stacked array (measured on an H100, Qwen3-8B shape, batch 1: 15.6 ms per step
    against 6.6 ms with per-layer arrays).
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, jax.Array | np.ndarray | Sequence[jax.Array]],
        *,
        dtype: jnp.dtype,
    ):
        specs = weight_specs(config)
        missing, extra = specs.keys() - weights.keys(), weights.keys() - specs.keys()
        if missing or extra:
            raise ValueError(f"weights do not match the config: missing {sorted(missing)}, unexpected {sorted(extra)}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        for name, (shape, _) in specs.items():
            value = weights[name]
            found = (len(value), *value[0].shape) if isinstance(value, (list, tuple)) else tuple(value.shape)
            if found != shape:
                raise ValueError(f"weight {name} has shape {found}, expected {shape}")
        for name in specs.keys() - LAYER_WEIGHTS:
            setattr(self, name, nnx.Param(jnp.asarray(weights[name], self.dtype), logical_axes=specs[name][1]))
        layer_names = sorted(specs.keys() & LAYER_WEIGHTS)
        self.layers = nnx.List(
            [
                LayerWeights(
                    {name: jnp.asarray(weights[name][index], self.dtype) for name in layer_names},
                    {name: specs[name][1][1:] for name in layer_names},
                )
                for index in range(config.num_layers)
            ]
        )
        inv_freq, self.attention_scaling = inverse_frequencies(config.rope, config.head_dim)
        self.inv_freq = nnx.Variable(jnp.asarray(inv_freq))

    def _weight(self, name: str) -> jax.Array:
        return getattr(self, name)[...]

    @property
    def value_layers(self) -> tuple[bool, ...]:
        """Per layer: whether its cache holds V; layers with W_KV hold K only (see `slim.py`)."""
        return tuple(not hasattr(layer, "w_kv") for layer in self.layers)

    @property
    def slim(self) -> bool:
        """Whether any layer's cache holds K only."""
        return not all(self.value_layers)

    def stacked(self, name: str) -> jax.Array:
        """A layer weight stacked over layers (a copy), e.g. for inspection or conversion."""
        return jnp.stack([getattr(layer, name)[...] for layer in self.layers])

    def extend(
        self,
        cache: KVCache | None,
        tokens: jax.Array,
        positions: jax.Array,
        *,
        logits_at: jax.Array | None = None,
        collect_pre_rope: bool = False,
        collect_rope_queries: bool = False,
        collect_attention: bool = False,
        pin: Pin | None = None,
    ) -> ExtendOutput:
        """Runs T new tokens per row against the cache (None: an empty one) and themselves.

        tokens, positions: (batch, T) int32; a negative position marks padding, which no
        query attends to. logits_at: (batch,) index into T of the one position per row whose
        logits are wanted; None returns logits for all T positions. The collect_* switches
        add per-layer extras to the output (see `ExtendOutput`); each costs only when on.
        A decode step (T = 1) on a GPU reads the cache with the length-aware kernels
        (`kernels/decode_attention.py`; for K-only layers `kernels/key_only_one_read.py` on Hopper
        GPUs where it is preferred, else `kernels/key_only_attention.py`: only
        slots below the cursor, so its cost follows the filled length), except with
        collect_attention, on a buffer no key block divides, or with `pin`. pin: on a mesh
        (`sharding.pinner`), the layouts of intermediates XLA would otherwise choose badly; the
        kernels are then off (a kernel is one device's program: XLA would gather the cache for it).
        """
        cfg = self.config
        kernel = pin is None and tokens.shape[1] == 1 and not collect_attention and decode_attention.supported()

        def by_kernel(cached: CacheLayer) -> bool:
            return kernel and decode_attention.block_size(kernel_slots(cached)) is not None

        x = jnp.take(self._weight("embed"), tokens, axis=0)
        cos, sin = rope_cos_sin(jnp.maximum(positions, 0), self.inv_freq[...], self.attention_scaling)

        def layer(x, w, cached: CacheLayer | None):
            h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
            q_pre, k_pre, v = project_qkv(cfg, w, h)
            q = apply_rope(q_pre, cos[:, :, None], sin[:, :, None])
            k = apply_rope(k_pre, cos[:, :, None], sin[:, :, None])
            new_pos = jnp.broadcast_to(
                positions[:, None, :], (positions.shape[0], cfg.num_kv_heads, positions.shape[1])
            )
            blocks = [(stored_block(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)), new_pos)]
            partials = []
            if cached is not None and by_kernel(cached):
                partials.append(kernel_partial(w, q, positions, cached, cache.cursor, self.attention_scale))
            elif cached is not None:
                block = stored_block(cached.k, cached.v) if cached.v is not None else key_only_block(w, cached, pin)
                blocks.insert(0, (block, cached.pos))
            attn, received = _attention(q, positions, blocks, self.attention_scale, collect_attention, partials)
            received_cache, received_new = (
                (received[0] if cached is not None else None, received[-1]) if received else (None, None)
            )
            out = jnp.einsum("bthk,hkd->btd", attn, w["wo"])
            if "bo" in w:
                out = out + w["bo"]
            x = x + out
            h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
            x = x + _mlp(w, h)
            extras = {
                "queries": q_pre.astype(jnp.float32) if collect_pre_rope else None,
                "keys": k_pre.astype(jnp.float32) if collect_pre_rope else None,
                "rope_queries": q if collect_rope_queries else None,
                "attention_cache": received_cache,
                "attention_new": received_new,
            }
            # A K-only layer caches keys before RoPE, slot-major: as computed, so that the write
            # into its buffer has no transpose (XLA had answered one by transposing the whole
            # buffer at every step).
            cached_keys = k_pre if "w_kv" in w else k.transpose(0, 2, 1, 3)
            return x, (cached_keys, v.transpose(0, 2, 1, 3), extras)

        layer_weights = [layer_module.arrays() for layer_module in self.layers]
        cached_layers = [None] * cfg.num_layers if cache is None else list(cache.layers())
        # A scan needs alike layers: a K-only cache with some layers holding V runs unrolled.
        alike = len({tuple(sorted(weights)) for weights in layer_weights}) == 1
        if jax.default_backend() == "cpu" and alike:
            # XLA:CPU compiles an unrolled stack of layers several times slower and runs it no
            # faster (SmolLM2: 33 s against 13 s for a first 128-token decode). Inside a decode
            # loop the weights' stacking is loop-invariant and hoisted; the cache's is a copy
            # per step, which the CPU's dynamic layer slices would make anyway.
            stacked_weights = jax.tree.map(lambda *ws: jnp.stack(ws), *layer_weights)
            stacked_cache = None if cache is None else jax.tree.map(lambda *ys: jnp.stack(ys), *cached_layers)
            x, (new_k, new_v, extras) = jax.lax.scan(lambda x, xs: layer(x, *xs), x, (stacked_weights, stacked_cache))
            new_k, new_v = tuple(new_k), tuple(new_v)
        else:
            outputs = []
            for weights, cached in zip(layer_weights, cached_layers):
                x, output = layer(x, weights, cached)
                outputs.append(output)
            new_k, new_v = tuple(o[0] for o in outputs), tuple(o[1] for o in outputs)
            extras = jax.tree.map(lambda *ys: jnp.stack(ys), *(o[2] for o in outputs))
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
        x = rms_norm(x, self._weight("final_norm"), cfg.rms_norm_eps)
        head = self._weight("embed").T if cfg.tie_word_embeddings else self._weight("lm_head")
        return ExtendOutput(logits=einsum_f32("...d,dv->...v", x, head), k=new_k, v=new_v, **extras)

    @property
    def attention_scale(self) -> float:
        return self.config.head_dim**-0.5


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An einsum accumulated in float32.

    XLA:CPU has no bf16 x bf16 -> f32 kernel for some batched dots, so on CPU the operands
    are upcast first; accelerators accumulate in f32 natively without the extra copies.
    """
    if jax.default_backend() == "cpu":
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, scaled by the weight in the input dtype (as transformers)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def project_qkv(cfg: ModelConfig, w: Mapping[str, jax.Array], h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-RoPE q (B,T,H,hd) and k, v (B,T,K,hd) of one layer from its normed input."""
    q = jnp.einsum("btd,dhk->bthk", h, w["wq"])
    k = jnp.einsum("btd,dhk->bthk", h, w["wk"])
    v = jnp.einsum("btd,dhk->bthk", h, w["wv"])
    q, k = pre_rope_qk(cfg, w, q, k)
    if "bv" in w:
        v = v + w["bv"]
    return q, k, v


def pre_rope_qk(
    cfg: ModelConfig, w: Mapping[str, jax.Array], q: jax.Array, k: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Everything between the projection and the rotation: Qwen2's bias, Qwen3's q/k norm."""
    if "bq" in w:
        q, k = q + w["bq"], k + w["bk"]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    return q, k


# One block of keys for `_attention`: (qg (B,T,K,G,hd), scale) -> (scores (B,K,G,T,S) float32,
# scaled, unmasked; values: unnormalized weights p (B,K,G,T,S) -> Σ_s p_s·V_s (B,K,G,T,hd) float32).
AttentionBlock = Callable[[jax.Array, float], tuple[jax.Array, Callable[[jax.Array], jax.Array]]]


def stored_block(keys: jax.Array, values: jax.Array) -> AttentionBlock:
    """Post-RoPE keys and values (B,K,S,hd) as stored."""

    def block(qg: jax.Array, scale: float) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        scores = einsum_f32("btkgd,bksd->bkgts", qg, keys) * scale
        return scores, lambda p: einsum_f32("bkgts,bksd->bkgtd", p.astype(values.dtype), values)

    return block


@dataclasses.dataclass(frozen=True)
class SoftmaxPartial:
    """Attention over a block of keys computed elsewhere, in the terms of one softmax:
    acc (B,K,G,T,hd) = Σ_s exp(score_s − row_max)·v_s, row_max and total (B,K,G,T,1), the
    largest visible score (or MASK_VALUE) and Σ_s exp(score_s − row_max), all float32."""

    acc: jax.Array
    row_max: jax.Array
    total: jax.Array


def kernel_slots(cached: CacheLayer) -> int:
    """The slots of a cache layer's buffer (K-only layers are slot-major)."""
    return cached.k.shape[2] if cached.v is not None else cached.k.shape[1]


def kernel_partial(
    w: Mapping[str, jax.Array],
    q: jax.Array,
    positions: jax.Array,
    cached: CacheLayer,
    length: jax.Array,
    scale: float,
) -> SoftmaxPartial:
    """A decode step's attention (q (B,1,H,hd) at positions (B,1)) over the first `length`
    slots of a cache layer, by the length-aware kernels: `decode_attention` for K and V; for a
    K-only layer `key_only_one_read` where `key_only_one_read.preferred` (one read of the keys,
    Hopper GPUs, short buffers or large batches), else `key_only_attention` (its sums
    over keys mapped to values with w)."""
    B, _, H, hd = q.shape
    if cached.v is None:
        one_read = key_only_one_read.preferred(cached.k)
        attend = key_only_one_read.key_only_one_read if one_read else key_only_attention.key_only_attention
        summed, row_max, total = attend(
            q[:, 0],
            cached.k,
            cached.pos[:, 0],
            positions[:, 0],
            length,
            inv_freq=cached.rotation.inv_freq,
            attention_scaling=cached.rotation.attention_scaling,
            scale=scale,
        )
        mass = total[:, :, None, None, None]
        acc = recovered_values(w, summed[:, :, None, None, :], mass)
        return SoftmaxPartial(acc, row_max[:, :, None, None, None], mass)
    K = cached.k.shape[1]
    acc, row_max, total = decode_attention.decode_attention(
        q.reshape(B, K, H // K, hd), cached.k, cached.v, cached.pos, positions[:, 0], length, scale=scale
    )
    return SoftmaxPartial(acc[:, :, :, None], row_max[..., None, None], total[..., None, None])


# The most bytes of float32 attention scores (all heads, every key) that `_attention` computes
# at once; more queries than that are taken in chunks. A prompt's prefill is one `extend` of
# the whole bucket: scored at once, its (B, heads, T, T) scores and their softmax weights were
# the largest buffers of a run (Qwen2.5-Coder-0.5B, 24 prompts of 4,096 tokens: 21 GiB each;
# 42.75 GiB of temporaries compiled for the CPU, 42.38 GiB asked of an H200, out of memory).
ATTENTION_SCORE_BYTES = 1 << 30


def query_chunk_rows(batch: int, heads: int, keys: int) -> int:
    """Queries per chunk of `_attention`: the largest power of two (at least 1) whose scores
    over `keys` keys fit in ATTENTION_SCORE_BYTES."""
    fit = max(1, ATTENTION_SCORE_BYTES // (batch * heads * keys * 4))
    return 1 << (fit.bit_length() - 1)


def _attention(
    q: jax.Array,
    positions: jax.Array,
    blocks: Sequence[tuple[AttentionBlock, jax.Array]],
    scale: float,
    collect_attention: bool = False,
    partials: Sequence[SoftmaxPartial] = (),
) -> tuple[jax.Array, list[jax.Array] | None]:
    """Attention of q (B,T,H,hd) at `positions` (B,T) over blocks of keys, one softmax.

    blocks: (block, key positions (B,K,S)) pairs: the cache's layer, then the T new keys.
    Masks come from positions: a key is visible when its position is valid and not after
    the query's. The new block and the cache are scored separately, so the cache is read in
    place, never copied to append to it. Here the whole buffer is read (XLA copies any
    dynamically sliced part of the cache before a matrix product); a decode step on a GPU
    reads the cache with the length-aware kernel instead, whose result comes in `partials`
    and joins the same softmax (not with collect_attention).

    Queries whose scores would pass ATTENTION_SCORE_BYTES (a prompt's prefill) are taken in
    chunks of `query_chunk_rows`, one chunk after another (`lax.scan`), so attention's scratch
    is O(chunk x keys) rather than O(T x keys). A query's softmax lies within its chunk, so the
    output is what scoring every query at once gives; received attention adds up chunk by chunk.

    Returns the output (B,T,H,hd) and, with collect_attention, per block the attention each
    key (B,K,S) received, summed over the queries of its GQA group.
    """
    B, T, H, hd = q.shape
    rows = query_chunk_rows(B, H, sum(key_pos.shape[-1] for _, key_pos in blocks))
    if T <= rows:
        return _attention_of_queries(q, positions, blocks, scale, collect_attention, partials)
    # T > 1 here, so no partials (the kernel serves single decode steps). Padding queries, at
    # position -1, see no key, and received attention leaves them out.
    count = -(-T // rows)
    padded = count * rows
    q_chunks = jnp.pad(q, ((0, 0), (0, padded - T), (0, 0), (0, 0))).reshape(B, count, rows, H, hd)
    position_chunks = jnp.pad(positions, ((0, 0), (0, padded - T)), constant_values=-1).reshape(B, count, rows)

    def chunk(received, chunk_inputs):
        out, chunk_received = _attention_of_queries(*chunk_inputs, blocks, scale, collect_attention)
        if collect_attention:
            received = [total + part for total, part in zip(received, chunk_received)]
        return received, out

    received = [jnp.zeros(key_pos.shape, jnp.float32) for _, key_pos in blocks] if collect_attention else None
    received, out = jax.lax.scan(chunk, received, (q_chunks.swapaxes(0, 1), position_chunks.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(B, padded, H, hd)[:, :T], received


def _attention_of_queries(
    q: jax.Array,
    positions: jax.Array,
    blocks: Sequence[tuple[AttentionBlock, jax.Array]],
    scale: float,
    collect_attention: bool,
    partials: Sequence[SoftmaxPartial] = (),
) -> tuple[jax.Array, list[jax.Array] | None]:
    """`_attention` with every query scored at once."""
    B, T, H, hd = q.shape
    K = blocks[0][1].shape[1]
    qg = q.reshape(B, T, K, H // K, hd)
    query_pos = positions[:, None, None, :, None]  # (B,1,1,T,1) against keys (B,K,G,T,S)
    scored = []
    for block, key_pos in blocks:
        scores, weighted_values = block(qg, scale)
        key_pos = key_pos[:, :, None, None, :]
        visible = (key_pos >= 0) & (key_pos <= query_pos) & (query_pos >= 0)
        scored.append((jnp.where(visible, scores, MASK_VALUE), weighted_values))
    row_max = functools.reduce(
        jnp.maximum, [jnp.max(scores, axis=-1, keepdims=True) for scores, _ in scored] + [p.row_max for p in partials]
    )
    weights = [jnp.exp(scores - row_max) for scores, _ in scored]
    rescaled = [jnp.exp(p.row_max - row_max) for p in partials]
    total = sum(
        [jnp.sum(w, axis=-1, keepdims=True) for w in weights] + [p.total * c for p, c in zip(partials, rescaled)]
    )
    acc = sum(
        [weighted_values(w) for w, (_, weighted_values) in zip(weights, scored)]
        + [p.acc * c for p, c in zip(partials, rescaled)]
    )
    out = (acc / total).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd).astype(q.dtype)
    if not collect_attention:
        return out, None
    query_valid = (positions >= 0)[:, None, None, :, None]
    return out, [jnp.sum(jnp.where(query_valid, w / total, 0.0), axis=(2, 3)) for w in weights]


def key_only_block(w: Mapping[str, jax.Array], cached: CacheLayer, pin: Pin | None = None) -> AttentionBlock:
    """A K-only cache layer (keys (B,S,K,hd) slot-major, cached before RoPE): V recomputed from K.

    MHA with a square W_K: the pre-RoPE keys of all heads, k = h·W_K + b_k, give
    h = (k − b_k)·W_K^{-1}, so V = (k − b_k)·W_KV + b_v with W_KV = W_K^{-1}·W_V (stored
    head-major, (K, D, hd)). The sum over slots comes first ((Σ_s p_s·k_s)·W_KV per head): one matrix product over
    the slot-major K as stored, and the bias terms need only Σ_s p_s. The scores rotate the
    keys on the fly: when decoding (one query per KV head) as a multiply-and-sum, which XLA
    fuses into one read of K; otherwise the rotated keys feed a matrix product. On a mesh
    (`pin`) the sums stay split like the cache's keys, over all heads' K features: a device
    combines every head's (small) probabilities with its own keys and rows of W_KV, and only
    the per-head values are summed across devices, where XLA had gathered every K instead.
    """
    # Pinned row-major: else XLA lays the loop-carried buffer out (B,K,S,hd) to suit the
    # scores' reduction and transposes all of it for the values' product at every step. Not
    # on a mesh: XLA gathers a layout constraint's whole operand (every device's K).
    keys = cached.k if pin is not None else with_layout_constraint(cached.k, Layout(major_to_minor=(0, 1, 2, 3)))
    B, S, K, hd = keys.shape

    def values(p: jax.Array) -> jax.Array:  # p: (B, K, 1, T, S), MHA so groups of one
        summed = einsum_f32("bkgts,bsd->bkgtd", p.astype(keys.dtype), keys.reshape(B, S, K * hd))
        if pin is not None:
            summed = pin(summed, ("batch", "value_heads", None, None, "key_features"))
        return recovered_values(w, summed, jnp.sum(p, axis=-1, keepdims=True))

    def block(qg: jax.Array, scale: float) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        rotated = cached.slot_major_rope_keys(keys)
        if qg.shape[1] * qg.shape[3] == 1:
            scores = jnp.sum(qg[:, :, :, 0].astype(jnp.float32) * rotated, axis=-1)  # (B, S, K)
            scores = scores.transpose(0, 2, 1)[:, :, None, None, :]
        else:
            scores = einsum_f32("btkgd,bskd->bkgts", qg, rotated)
        return scores * scale, values

    return block


def recovered_values(w: Mapping[str, jax.Array], summed: jax.Array, mass: jax.Array) -> jax.Array:
    """Σ_s p_s·v_s per head (B,K,1,T,hd) from a K-only layer's Σ_s p_s·k_s (B,K,1,T,K·hd), the
    pre-RoPE keys of all heads, and Σ_s p_s (B,K,1,T,1): v = (k − b_k)·W_KV + b_v is linear."""
    if "bk" in w:
        summed = summed - mass * w["bk"].reshape(-1).astype(jnp.float32)
    out = einsum_f32("bkgtd,kdc->bkgtc", summed, w["w_kv"])
    if "bv" in w:
        out = out + mass * w["bv"][None, :, None, None, :].astype(jnp.float32)
    return out


def _mlp(w: Mapping[str, jax.Array], h: jax.Array) -> jax.Array:
    gate = jnp.einsum("btd,df->btf", h, w["w_gate"])
    up = jnp.einsum("btd,df->btf", h, w["w_up"])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w["w_down"])
