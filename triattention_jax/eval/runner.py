"""Quality of KV-cache methods against full attention, through the real decode path.

Tasks (each cell is one (task, method, budget, sample)):
- fidelity: teacher-forced sequences; mean KL(full ‖ method), top-1 agreement with full
  attention and ΔNLL, over the positions after the first eviction.
- divergence: free-running greedy generation; tokens until the first divergence from full
  attention, and the share of positions that agree.
- needle: a pass key near the start of a teacher-forced stream, at least four budgets of
  filler, then a question; greedy accuracy on the key's tokens, exact match, and the share of
  the fact's tokens still cached when the answer is read.
- dfs: the paper's recursive state query; the greedy answer's DFS stack (also current node
  and visited set) after k steps on a random graph, exact match against the true state.
- code: long-context code completion; about seq_len tokens of a held-out standard-library
  source file, then the greedy continuation's next lines against the file's own: exact match
  and edit similarity.

needle, dfs and code are scored against a known answer, so full attention is a row of their tables.
Each (method, budget) runs its pending samples as one batch. fidelity and divergence may run on
the user's own text files instead of the built-in texts (`texts.text_file_samples`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from triattention_jax.calibration import fit_for_model
from triattention_jax.checkpoints.stats import FitResult
from triattention_jax.checkpoints.store import LoadedModel
from triattention_jax.decoding import generate, teacher_forced_pieces
from triattention_jax.errors import UserError
from triattention_jax.eval.fidelity import FullAttentionReference
from triattention_jax.eval.metrics import divergence_metrics
from triattention_jax.eval.report import GROUND_TRUTH_TASKS, write_outputs
from triattention_jax.eval.store import ResultStore, check_output_folder, run_settings
from triattention_jax.eval.tasks.code import MAX_NEW_TOKENS, code_files, code_metrics, code_sample
from triattention_jax.eval.tasks.dfs import dfs_metrics, dfs_problem, dfs_prompt, parse_dfs_answer
from triattention_jax.eval.tasks.needle import needle_key, needle_length, needle_metrics, needle_stream
from triattention_jax.eval.texts import (
    PREFILL_TOKENS,
    REASONING_PROMPTS,
    SOURCES,
    TextFile,
    document_name,
    fidelity_tokens,
    source_text,
    text_file_samples,
    text_tokens,
)
from triattention_jax.methods import PolicySettings, build_policy, parse_method
from triattention_jax.policies import FullAttention, KVPolicy
from triattention_jax.policies.triattention_fit import FEATURES
from triattention_jax.prompts import encode_prompts, has_chat_template, token_fingerprint


def build_eval_policy(model: LoadedModel, method: str, budget: int, *, slack_trigger: bool = False) -> KVPolicy:
    """Every method with the same rule for the prefix: the teacher-forced text is one document,
    not a user prompt, so no method protects its first tokens (TriAttention would otherwise
    spend part of its budget on them while the baselines do not); a variant may say otherwise.
    slack_trigger: the compaction phase of every method (`EvictionPolicy`)."""
    return build_policy(model, method, PolicySettings(budget=budget, protect_prompt=False, slack_trigger=slack_trigger))


Group = tuple[str, int, list[int]]  # method, budget, samples not stored yet
Progress = Callable[[int, int, str], None]  # (cells done, cells to do, what runs now)
Policies = Callable[[str, int], KVPolicy]  # (method, budget) -> the policy a cell runs
TEXT_FILE_TASKS = ("fidelity", "divergence")
DEFAULT_SAMPLES = 3


def _pending_groups(
    store: ResultStore, task: str, methods: list[str], budgets: list[int], samples: range
) -> list[Group]:
    groups = [
        (m, b, [s for s in samples if store.key(task, m, b, s) not in store.cells]) for m in methods for b in budgets
    ]
    return [g for g in groups if g[2]]


def _samples_in(groups: list[Group]) -> list[int]:
    return sorted({s for _, _, samples in groups for s in samples})


def _run_groups(
    store: ResultStore,
    task: str,
    groups: list[Group],
    run_group: Callable[[str, int, list[int]], list[dict]],
    progress: Progress,
) -> None:
    """run_group(method, budget, samples) computes a group's cells (one per sample, as one
    batch); each is stored as it comes, so an interrupted run resumes from the groups left."""
    total, done = sum(len(samples) for *_, samples in groups), 0
    for method, budget, samples in groups:
        progress(done, total, f"{task}/{method}/{budget} ({len(samples)} samples)")
        for sample, cell in zip(samples, run_group(method, budget, samples), strict=True):
            store.put(store.key(task, method, budget, sample), cell)
        done += len(samples)
    if groups:
        progress(total, total, "")


def run_fidelity(
    model: LoadedModel,
    store: ResultStore,
    methods: list[str],
    budgets: list[int],
    samples: range,
    seq_len: int,
    progress: Progress,
    policies: Policies,
    inputs: Sequence[list[int]] | None = None,
) -> None:
    """inputs: the samples' token ids by index (the user's texts) instead of the built-in texts."""
    groups = _pending_groups(store, "fidelity", methods, budgets, samples)
    needed = _samples_in(groups)
    if not needed:
        return
    batch = (
        fidelity_tokens(model, needed, seq_len) if inputs is None else np.asarray([inputs[s] for s in needed], np.int32)
    )
    fingerprints = {s: token_fingerprint(row) for s, row in zip(needed, batch)}
    for sample, fingerprint in fingerprints.items():
        store.check_input("fidelity", sample, fingerprint)
    reference = FullAttentionReference.of(model.transformer, batch)
    row_of = {s: i for i, s in enumerate(needed)}

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        cells = reference.fidelity(policies(method, budget), [row_of[s] for s in group])
        return [cell | {"input": fingerprints[s]} for s, cell in zip(group, cells)]

    _run_groups(store, "fidelity", groups, run_group, progress)


def run_divergence(
    model: LoadedModel,
    store: ResultStore,
    methods: list[str],
    budgets: list[int],
    samples: range,
    seq_len: int,
    progress: Progress,
    policies: Policies,
    inputs: Sequence[list[int]] | None = None,
) -> None:
    """inputs: the samples' prompts by index (the user's texts) instead of the built-in ones."""
    groups = _pending_groups(store, "divergence", methods, budgets, samples)
    needed = _samples_in(groups)
    if not needed:
        return
    if inputs is None:
        texts = [REASONING_PROMPTS[s % len(REASONING_PROMPTS)] for s in needed]
        prompts = dict(zip(needed, encode_prompts(model.tokenizer, texts, chat=has_chat_template(model.tokenizer))))
    else:
        prompts = {s: inputs[s] for s in needed}
    reference = dict(
        zip(needed, generate(model.transformer, list(prompts.values()), eos_ids=(), max_new_tokens=seq_len).token_ids)
    )

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        policy = policies(method, budget)
        answers = generate(
            model.transformer, [prompts[s] for s in group], eos_ids=(), max_new_tokens=seq_len, policy=policy
        ).token_ids
        return [divergence_metrics(reference[s], answer) for s, answer in zip(group, answers)]

    _run_groups(store, "divergence", groups, run_group, progress)


def run_needle(
    model: LoadedModel,
    store: ResultStore,
    methods: list[str],
    budgets: list[int],
    samples: range,
    seq_len: int,
    progress: Progress,
    policies: Policies,
) -> None:
    context = model.config.max_position_embeddings
    for budget in budgets:
        if needle_length(seq_len, budget) > context:
            raise UserError(
                f"the needle at budget {budget} needs {needle_length(seq_len, budget)} tokens (its filler covers "
                f"four budgets), more than the model's context of {context}: lower --budgets or --seq_len"
            )

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        length = needle_length(seq_len, budget)
        streams = [
            needle_stream(
                model.tokenizer,
                needle_key(s),
                text_tokens(model.tokenizer, source_text("pydoc_prose", s), length, add_special_tokens=False),
                length,
            )
            for s in group
        ]
        fingerprints = [token_fingerprint(stream.tokens) for stream in streams]
        for sample, fingerprint in zip(group, fingerprints):
            store.check_input("needle", sample, fingerprint, budget)
        pieces = teacher_forced_pieces(
            model.transformer,
            np.stack([st.tokens for st in streams]),
            prefill_length=PREFILL_TOKENS,
            policy=policies(method, budget),
        )
        # Each stream's cached positions (layers, kv_heads, slots) when its answer's first token
        # was predicted, read before the next round donates that cache.
        first_rows = [stream.answer[0] - 1 for stream in streams]
        greedy, positions = [], [None] * len(streams)
        for piece in pieces:
            greedy.append(np.asarray(jnp.argmax(piece.logprobs, axis=-1)))
            for i, row in enumerate(first_rows):
                if piece.begin <= row < piece.begin + piece.logprobs.shape[1]:
                    positions[i] = np.stack([np.asarray(p[i]) for p in piece.cache.pos])
        return [
            needle_metrics(row, stream, held) | {"input": fingerprint}
            for row, stream, held, fingerprint in zip(np.concatenate(greedy, axis=1), streams, positions, fingerprints)
        ]

    _run_groups(store, "needle", _pending_groups(store, "needle", methods, budgets, samples), run_group, progress)


def _greedy_answers(
    model: LoadedModel, prompts: dict[int, list[int]], max_new_tokens: int, policies: Policies
) -> Callable[[str, int, list[int]], list[list[int]]]:
    """(method, budget, samples) -> each sample's greedy answer to its prompt (token ids, up to
    the model's EOS), the samples as one batch. Full attention's answers are the same at every
    budget, so they are generated once."""
    full: dict[int, list[int]] = {}

    def run(policy: KVPolicy, group: list[int]) -> list[list[int]]:
        return generate(
            model.transformer,
            [prompts[s] for s in group],
            max_new_tokens=max_new_tokens,
            eos_ids=model.config.eos_token_ids,
            policy=policy,
        ).token_ids

    def answers(method: str, budget: int, group: list[int]) -> list[list[int]]:
        if method != "full":
            return run(policies(method, budget), group)
        missing = [s for s in group if s not in full]
        if missing:
            full.update(zip(missing, run(FullAttention(), missing)))
        return [full[s] for s in group]

    return answers


def run_dfs(
    model: LoadedModel,
    store: ResultStore,
    methods: list[str],
    budgets: list[int],
    samples: range,
    seq_len: int,
    progress: Progress,
    policies: Policies,
) -> None:
    groups = _pending_groups(store, "dfs", methods, budgets, samples)
    problems = {s: dfs_problem(s) for s in _samples_in(groups)}
    texts = [dfs_prompt(p) for p in problems.values()]
    prompts = dict(zip(problems, encode_prompts(model.tokenizer, texts, chat=has_chat_template(model.tokenizer))))
    answers = _greedy_answers(model, prompts, seq_len, policies)

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        cells = []
        for sample, ids in zip(group, answers(method, budget, group)):
            parsed = parse_dfs_answer(model.tokenizer.decode(ids, skip_special_tokens=True))
            cells.append(
                {
                    **dfs_metrics(problems[sample].answer, parsed),
                    "steps": problems[sample].steps,
                    "answer_tokens": len(ids),
                    "answer": parsed.as_json(),
                }
            )
        return cells

    _run_groups(store, "dfs", groups, run_group, progress)


def run_code(
    model: LoadedModel,
    store: ResultStore,
    methods: list[str],
    budgets: list[int],
    samples: range,
    seq_len: int,
    progress: Progress,
    policies: Policies,
) -> None:
    """seq_len: the most tokens of a prompt (`tasks.code.code_sample`); MAX_NEW_TOKENS are generated after it."""
    context = model.config.max_position_embeddings
    if seq_len + MAX_NEW_TOKENS > context:
        raise UserError(
            f"code prompts of up to --seq_len {seq_len} tokens and {MAX_NEW_TOKENS} generated tokens exceed the "
            f"model's context of {context}: lower --seq_len to at most {context - MAX_NEW_TOKENS}"
        )
    groups = _pending_groups(store, "code", methods, budgets, samples)
    needed = _samples_in(groups)
    if not needed:
        return
    files = code_files(model.tokenizer, seq_len)
    problems = {s: code_sample(model.tokenizer, files, s, seq_len) for s in needed}
    fingerprints = {s: token_fingerprint(p.tokens) for s, p in problems.items()}
    for sample, fingerprint in fingerprints.items():
        store.check_input("code", sample, fingerprint)
    answers = _greedy_answers(model, {s: p.tokens for s, p in problems.items()}, MAX_NEW_TOKENS, policies)

    def run_group(method: str, budget: int, group: list[int]) -> list[dict]:
        return [
            code_metrics(model.tokenizer.decode(ids, skip_special_tokens=True), problems[s].reference)
            | {"file": problems[s].name, "prompt_tokens": len(problems[s].tokens), "input": fingerprints[s]}
            for s, ids in zip(group, answers(method, budget, group))
        ]

    _run_groups(store, "code", groups, run_group, progress)


TASKS = {"fidelity": run_fidelity, "divergence": run_divergence, "needle": run_needle, "dfs": run_dfs, "code": run_code}


def _fit_fingerprint(fit: FitResult) -> str:
    """The fit's weights and, where it mixes one in, its redundancy weight (none or 0 gives the
    weights' fingerprint alone, as results folders written before the mix recorded)."""
    words = fit.weights.view(np.int32).reshape(-1)
    mix = fit.metadata.get("redundancy_weight", 0.0)
    return token_fingerprint(np.append(words, np.float32(mix).view(np.int32)) if mix else words)


def fit_document_names(fit: FitResult) -> list[str]:
    """The texts a fit's weights were fitted on and those any of its choices decoded."""
    choices = [*fit.metadata.get("earlier_selections", []), fit.metadata.get("selection", {})]
    return [*fit.metadata.get("documents", []), *(name for choice in choices for name in choice.get("documents", []))]


def _check_disjoint_from_fit(task: str, samples: range, fit_documents: Sequence[str]) -> None:
    """Refuses a study whose texts include one triattention_fit's weights were fitted or chosen on."""
    # divergence prompts are REASONING_PROMPTS, and code reads sources below FIT_FIRST_SOURCE only:
    # fitting reads neither.
    if task != "fidelity":
        return
    fitted_on = set(fit_documents)
    for sample in samples:
        name = document_name(SOURCES[sample % len(SOURCES)], sample // len(SOURCES))
        if name in fitted_on:
            raise UserError(
                f"sample {sample} reads {name}, one of the texts triattention_fit was fitted on: evaluate other "
                "samples (a lower --seed or --num_samples) or refit on other texts"
            )


def check_study(task: str, methods: Sequence[str], texts: Sequence[TextFile] = ()) -> None:
    """Refuses, before the model is loaded, a task, method list or text files that cannot run."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if texts and task not in TEXT_FILE_TASKS:
        raise UserError(f"--text_file serves --task {' and '.join(TEXT_FILE_TASKS)}, not {task}: leave it out")
    for method in methods:
        parse_method(method)
    if not methods:
        raise UserError("no methods given: pass --methods, e.g. triattention,streaming")


def evaluate(
    model: LoadedModel,
    *,
    task: str,
    methods: list[str],
    budgets: list[int],
    num_samples: int | None = None,
    seq_len: int,
    out: Path,
    seed: int = 0,
    progress: Progress | None = None,
    slack_trigger: bool = False,
    texts: Sequence[TextFile] = (),
) -> list[Path]:
    """Runs the cells not in out/results.json yet; writes the table and plots; returns the files.

    Samples are numbered from `seed`: sample i draws its text (or prompt, key, graph) by index,
    so a seed picks another set of samples and results of different seeds accumulate side by
    side. seq_len: tokens per sequence (fidelity; the needle's least length; code: the
    prompt's most) or generated tokens (divergence; dfs at most). `progress(done, total,
    running)` is called before each group of cells and once at the end. The table compares the
    first method with each other one, sample by sample. slack_trigger: every method compacts in
    the official implementation's phase (`EvictionPolicy`). texts (`texts.read_text_files`;
    fidelity and divergence): the samples come from these files (`texts.text_file_samples`),
    sample i the i-th they give. num_samples: by default 3, or with texts every sample from
    `seed` on.
    """
    check_study(task, methods, texts)
    reference = methods[0]
    if task in GROUND_TRUTH_TASKS and "full" not in methods:
        methods = ["full", *methods]
    check_output_folder(out)
    run = TASKS[task]
    if texts:
        inputs = text_file_samples(model, texts, task, seq_len)
        num_samples = max(1, len(inputs) - seed) if num_samples is None else num_samples
        if seed + num_samples > len(inputs):
            raise UserError(
                f"the --text_file texts give {len(inputs)} {task} samples, numbered from 0, and this run asks for "
                f"samples {seed} to {seed + num_samples - 1}: lower --seed or --num_samples (without --num_samples, "
                "every sample from --seed on)"
            )
        run = functools.partial(run, inputs=inputs)
    samples = range(seed, seed + (DEFAULT_SAMPLES if num_samples is None else num_samples))
    # Each triattention_fit variant's weights (its fitted_scorer option, else the model's).
    fits = {
        m: fit_for_model(model, FEATURES, parse_method(m)[1].get("fitted_scorer"))
        for m in methods
        if parse_method(m)[0] == "triattention_fit"
    }
    for fitted in fits.values():
        if not texts:
            _check_disjoint_from_fit(task, samples, fit_document_names(fitted))
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(
        model,
        seq_len,
        slack_trigger=slack_trigger,
        text_files=[t.sha256 for t in texts],
        fitted_scorers={m: _fit_fingerprint(f) for m, f in fits.items()},
    )
    store = ResultStore(out, settings)
    run(
        model,
        store,
        methods,
        budgets,
        samples,
        seq_len,
        progress or (lambda done, total, running: None),
        functools.partial(build_eval_policy, model, slack_trigger=slack_trigger),
    )
    return [store.path, *write_outputs(store, task, out, reference)]
