"""How low can a query-free scorer's KL go? An oracle for issue 18's fidelity targets.

  python results/study/oracle.py MODEL OUT SAMPLES [SAMPLES ...]   e.g. smollm2-135m-instruct
      results/study/smol_cpu/fidelity_oracle 0,1 3,4

At each compaction the oracle keeps, per KV head, the keys that full attention's own next 512
queries pay the most attention (summed over the GQA group, each query normalised over the full
model's keys), which is exactly what `triattention_fit` is fitted to predict. It reads the future,
so no decoding method can do it; it bounds what ranking keys by their future attention can give
under the same schedule and budget. Two variants: `oracle_per_head` shares one token set per
KV-head index across layers (the aggregation TriAttention and the fit use, log-mass averaged
over layers); `oracle_per_layer_per_head` lets every layer keep its own. The cells go through
the library's fidelity runner (same teacher forcing, metrics and positions as every method),
into OUT/results.json; each SAMPLES group (comma-separated indices) runs as one batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from triattention_jax.cache import EMPTY_POSITION, KVCache, layer_by_layer
from triattention_jax.checkpoints.store import LoadedModel, load_model
from triattention_jax.eval.runner import run_fidelity
from triattention_jax.eval.store import ResultStore, run_settings
from triattention_jax.eval.texts import fidelity_tokens
from triattention_jax.fitting import trace_sequence
from triattention_jax.policies.base import EvictionPolicy, RoundContext, array_field, policy_dataclass
from triattention_jax.scoring import aggregate

HORIZON = 512
SEQ_LEN = 4096
BUDGET = 512
VARIANTS = {"oracle_per_head": "per_head", "oracle_per_layer_per_head": "per_layer_per_head"}


@policy_dataclass
class FutureAttention(EvictionPolicy):
    """queries: (layers, batch, T + HORIZON, heads, head_dim) full attention's post-RoPE queries,
    zero after T; log_norm: (layers, batch, heads, T + HORIZON) each query's log-sum-exp over
    the full model's keys, +inf after T (so padding pays nothing)."""

    queries: jax.Array = array_field()
    log_norm: jax.Array = array_field()
    budget: int = BUDGET
    protect_prompt: bool = False
    window: int = 0
    aggregation: str = "per_head"
    attention_scale: float = 1.0

    def scores(self, cache: KVCache, context: RoundContext) -> jax.Array:
        # Each row's next HORIZON queries (its own t0): from axis 0 of the queries, 1 of the norms.
        ahead_queries = jax.vmap(lambda x, t: jax.lax.dynamic_slice_in_dim(x, t, HORIZON, 0))
        ahead_norms = jax.vmap(lambda x, t: jax.lax.dynamic_slice_in_dim(x, t, HORIZON, 1))

        def one_layer(layer, queries: jax.Array, log_norm: jax.Array) -> jax.Array:
            B, K, S, hd = layer.rope_keys.shape
            q = ahead_queries(queries, context.position)  # (B, HORIZON, H, hd)
            norm = ahead_norms(log_norm, context.position)  # (B, H, HORIZON)
            H = q.shape[2]
            keys = jnp.repeat(layer.rope_keys.astype(jnp.float32), H // K, axis=1)
            logits = jnp.einsum("bqhd,bhsd->bhqs", q, keys) * self.attention_scale
            mass = jnp.sum(jnp.exp(logits - norm[..., None]), axis=2).reshape(B, K, H // K, S).sum(2)
            return jnp.log(mass + 1e-30)

        scores = jnp.stack(layer_by_layer(one_layer, cache.layers(), list(self.queries), list(self.log_norm)))
        valid = cache.stacked("pos") != EMPTY_POSITION
        return aggregate(jnp.where(valid, scores, -jnp.inf), valid, self.aggregation)


@jax.jit
def _log_norms(queries: jax.Array, keys: jax.Array, attention_scale: float) -> jax.Array:
    """Each query's log-sum-exp over the keys before it, (layers, heads, T), from one sequence's
    `fitting.trace_sequence` queries (layers, T, heads, hd) and keys (layers, kv_heads, T, hd)."""
    T = queries.shape[1]
    causal = jnp.tri(T, dtype=bool)

    def layer_norm(qk: tuple[jax.Array, jax.Array]) -> jax.Array:
        q, k = qk
        H, K = q.shape[1], k.shape[0]
        logits = jnp.einsum("thd,hsd->hts", q, jnp.repeat(k, H // K, axis=0)) * attention_scale
        return jax.nn.logsumexp(jnp.where(causal, logits, -jnp.inf), axis=-1)

    return jax.lax.map(layer_norm, (queries.astype(jnp.float32), keys.astype(jnp.float32)))


def oracle_arrays(model: LoadedModel, batch: np.ndarray, attention_scale: float) -> tuple[np.ndarray, np.ndarray]:
    graphdef, state = nnx.split(model.transformer)
    queries, norms = [], []
    for row in batch:
        q, k, _ = trace_sequence(graphdef, state, jnp.asarray(row[None]))
        queries.append(np.asarray(q, np.float32))
        norms.append(np.asarray(_log_norms(q, k, attention_scale)))
    queries = np.pad(np.stack(queries, axis=1), ((0, 0), (0, 0), (0, HORIZON), (0, 0), (0, 0)))  # (L, B, T+h, H, hd)
    norms = np.pad(np.stack(norms, axis=1), ((0, 0), (0, 0), (0, 0), (0, HORIZON)), constant_values=np.inf)
    return queries, norms


def main(model_name: str, out: str, groups: list[list[int]]) -> None:
    model = load_model(model_name)
    scale = model.transformer.config.head_dim**-0.5
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    store = ResultStore(folder, run_settings(model, SEQ_LEN))
    for samples in groups:
        batch_samples = range(samples[0], samples[-1] + 1)
        if samples != list(batch_samples):
            sys.exit(f"samples {samples}: give consecutive indices (one batch)")
        if any(store.key("fidelity", m, BUDGET, s) in store.cells for m in VARIANTS for s in samples):
            print(f"samples {samples}: already there")
            continue
        # The oracle's rows must be the batch's rows: every cell of the group is pending.
        queries, norms = oracle_arrays(model, fidelity_tokens(model, samples, SEQ_LEN), scale)

        def policies(method: str, budget: int, queries=queries, norms=norms) -> FutureAttention:
            return FutureAttention(
                queries=jnp.asarray(queries),
                log_norm=jnp.asarray(norms),
                budget=budget,
                aggregation=VARIANTS[method],
                attention_scale=scale,
            )

        run_fidelity(
            model,
            store,
            list(VARIANTS),
            [BUDGET],
            batch_samples,
            SEQ_LEN,
            lambda done, total, running: print(f"{done}/{total} {running}", flush=True),
            policies,
        )
    for key, cell in sorted(store.cells.items()):
        print(key, f"kl {cell['kl']:.4f}", cell["input"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [[int(s) for s in group.split(",")] for group in sys.argv[3:]])
