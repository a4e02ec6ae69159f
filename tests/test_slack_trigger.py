"""The official implementation's compaction phase (`slack_trigger`, its `use_slack_trigger`):
compactions exactly when the buffer holds budget + divide_length tokens, on the host schedule
and in the real rounds of generation and teacher forcing."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, WIDE, random_transformer
from flax import nnx

from triattention_jax.bench.presets import random_stats
from triattention_jax.decoding import DecodeState, decode_round, generate, prefill, prompt_bucket, teacher_force
from triattention_jax.methods import PolicySettings, build_policy, parse_method
from triattention_jax.policies import EvictionPolicy, StreamingLLM, policy_class, policy_names
from triattention_jax.sampling import Sampler

BUDGET = 40
DIVIDE = 16


@pytest.fixture(scope="module")
def transformer():
    return random_transformer(WIDE)


def _official_compactions(prompt_tokens: int, budget: int, divide_length: int, new_tokens: int) -> list[int]:
    """The official rule (count_prompt_tokens, use_slack_trigger): each decode step appends its
    token, and a cache of budget + divide_length tokens is then cut to budget. The steps after
    which it compacts, among those a later step sees."""
    length, compactions = prompt_tokens, []
    for step in range(1, new_tokens):
        length += 1
        if length >= budget + divide_length:
            compactions.append(step)
            length = budget
    return compactions


def _compactions(policy: EvictionPolicy, prompt_tokens: int, divide_length: int, new_tokens: int) -> list[int]:
    """Ours: the decode steps done when each compacting round starts."""
    bucket = prompt_bucket(prompt_tokens)
    rounds = policy.round_steps(prompt_tokens, bucket, new_tokens, divide_length)
    assert new_tokens <= sum(rounds) < new_tokens + divide_length
    return [sum(rounds[:i]) for i in policy.compacting_rounds(prompt_tokens, bucket, new_tokens, divide_length)]


@pytest.mark.parametrize("divide_length", [1, 7, 16, 128])
def test_compactions_follow_the_official_rule(divide_length):
    for prompt_tokens, budget, new_tokens in itertools.product(
        [1, 5, 63, 64, 65, 100, 200], [40, 64, 100, 128, 256, 300], [1, 50, 130, 700]
    ):
        if prompt_tokens <= budget:
            policy = StreamingLLM(budget=budget, slack_trigger=True)
            assert _compactions(policy, prompt_tokens, divide_length, new_tokens) == _official_compactions(
                prompt_tokens, budget, divide_length, new_tokens
            ), (prompt_tokens, budget, new_tokens)


def test_default_schedule_is_whole_rounds_from_the_start():
    # Prompt bucket 64, budget 256 + 128 slots: rounds start at cursor 64, 192, 320, 384, ...
    policy = StreamingLLM(budget=256)
    assert policy.round_steps(10, 64, 700, 128) == [128] * 6
    assert _compactions(policy, 10, 128, 700) == [256, 384, 512, 640]
    assert _compactions(dataclasses.replace(policy, slack_trigger=True), 10, 128, 700) == [374, 502, 630]


def test_every_eviction_policy_takes_it():
    assert parse_method("h2o:slack_trigger=true") == ("h2o", {"slack_trigger": True})
    for name in policy_names():
        cls = policy_class(name)
        if issubclass(cls, EvictionPolicy):
            assert {f.name: f.default for f in dataclasses.fields(cls)}["slack_trigger"] is False, name


@pytest.mark.parametrize("name", ["streaming", "triattention", "expected_attention"])
def test_build_policy_passes_it(transformer, name):
    settings = PolicySettings(budget=BUDGET, slack_trigger=True)
    assert build_policy(transformer, name, settings, stats=random_stats(transformer)).slack_trigger


def test_cursor_at_every_compaction_is_budget_plus_divide_length(transformer):
    """Real rounds after a 5-token prompt (bucket 64, compacted at prefill to the budget): the
    cursor counts exactly the tokens in the buffer, as the official cache's length does, and
    stands at budget + divide_length whenever a round starts with a compaction."""
    policy = StreamingLLM(budget=BUDGET, slack_trigger=True)
    graphdef, state = nnx.split(transformer)
    prompt, new_tokens = 5, 120
    bucket = prompt_bucket(prompt)
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :prompt] = np.random.default_rng(0).integers(3, transformer.config.vocab_size, prompt)
    lengths = jnp.asarray([prompt], jnp.int32)
    logits, cache = prefill(
        graphdef, state, policy, jnp.asarray(tokens), lengths, num_slots=policy.num_slots(bucket, new_tokens, DIVIDE)
    )
    key, sampler = jax.random.key(0), Sampler()
    decode = DecodeState(sampler(logits, key), lengths, jnp.zeros(1, bool), jnp.zeros((), jnp.int32))
    rounds = policy.round_steps(prompt, bucket, new_tokens, DIVIDE)
    compacting = policy.compacting_rounds(prompt, bucket, new_tokens, DIVIDE)
    assert rounds[0] == (BUDGET - prompt) % DIVIDE and len(compacting) > 3
    for index, steps in enumerate(rounds):
        cursor = int(cache.cursor)
        np.testing.assert_array_equal(np.sum(np.asarray(cache.stacked("pos")) >= 0, axis=-1), cursor)
        cache, decode, _ = decode_round(
            graphdef,
            state,
            policy,
            cache,
            decode,
            lengths,
            key,
            jnp.asarray([-2], jnp.int32),
            sampler=sampler,
            divide_length=DIVIDE,
            num_steps=steps,
        )
        if index in compacting:
            assert cursor == BUDGET + DIVIDE and int(cache.cursor) == BUDGET + steps
        else:
            assert int(cache.cursor) == cursor + steps <= BUDGET + DIVIDE


# SnapKV observes recent queries, TriAttention none; every policy's block mode is checked in the
# default phase by test_teacher_forcing.
@pytest.mark.parametrize("name", ["snapkv", "triattention"])
def test_generate_and_teacher_force_agree(transformer, name):
    """Greedy tokens equal teacher forcing's argmax on them (step mode, generation's own step);
    block mode's log-probs equal step mode's, over compactions in the official phase."""
    settings = PolicySettings(budget=BUDGET, slack_trigger=True)
    policy = build_policy(transformer, name, settings, stats=random_stats(transformer, seed=1))
    prompt = np.random.default_rng(2).integers(3, transformer.config.vocab_size, 9).tolist()
    generated = generate(
        transformer, [prompt], eos_ids=(), max_new_tokens=100, divide_length=DIVIDE, policy=policy
    ).token_ids[0]
    sequence = np.asarray([prompt + generated], np.int32)
    steps, block = (
        teacher_force(transformer, sequence, prefill_length=len(prompt), policy=policy, divide_length=DIVIDE, block=b)
        for b in (False, True)
    )
    assert steps[0, len(prompt) - 1 : -1].argmax(-1).tolist() == generated
    np.testing.assert_allclose(block, steps, atol=5e-5, rtol=1e-5)


def test_streaming_pieces_split_the_short_first_round(transformer):
    """Longest prompt 30, budget 48, rounds of 32: the first round is 18 steps, streamed in
    pieces of 9 (the longest divisor of 18 up to 16), then whole rounds in pieces of 16; the
    tokens and the buffer are those of whole rounds."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, transformer.config.vocab_size, n).tolist() for n in (9, 30)]
    policy = StreamingLLM(budget=48, slack_trigger=True)
    options = dict(eos_ids=(), max_new_tokens=160, divide_length=32, policy=policy)
    whole = generate(transformer, prompts, **options)
    assert whole.num_decode_steps == 18 + 5 * 32
    seen = []
    streamed = generate(transformer, prompts, **options, on_round=lambda generated: seen.append(len(generated[0])))
    assert seen == [9, 18, *range(34, 160, 16), 160]
    assert streamed.token_ids == whole.token_ids
    assert streamed.kv_cache_bytes == whole.kv_cache_bytes


def test_commands_take_the_flag():
    """decode (through `policy_settings`), evaluate and benchmark define --slack_trigger."""
    code = (
        "import importlib, sys\n"
        "from absl import flags\n"
        "importlib.import_module('triattention_jax.cli.' + sys.argv[1])\n"
        "flags.FLAGS(['command', '--slack_trigger'])\n"
        "from triattention_jax.cli import flags as shared\n"
        "print(shared.policy_settings().slack_trigger if sys.argv[1] == 'decode' else flags.FLAGS.slack_trigger)\n"
    )
    for command in ("decode", "evaluate", "benchmark"):
        result = subprocess.run(
            [sys.executable, "-c", code, command], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
        )
        assert result.stdout.strip() == "True", result.stderr[-2000:]
