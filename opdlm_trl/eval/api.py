"""Evaluation API: a converted student (static and dynamic decoding) beside its AR teacher on one prompt set.

For every system the same prompts are decoded greedily and judged the same way:

* ``pass@1`` when the dataset carries executable tests (HumanEval columns ``test`` / ``entry_point``),
* teacher NLL per token of the generated text and top-1 agreement with the teacher (one causal teacher
  forward over ``prompt + completion``, :mod:`opdlm_trl.eval.metrics`),
* tokens per forward (completion tokens / the model forwards that produced them; AR decoding = 1.0),
* wall time and tokens per second,
* for the student: the out-of-order commit rate and the chain-bound ceiling on its own text
  (:mod:`opdlm_trl.diagnostics`), for each commit rule asked for (``commit_orders``).

:func:`evaluate_model` takes the student, a teacher and one :class:`EvalSettings`; the ``opdlm-eval`` command line
(:mod:`opdlm_trl.eval.cli`) builds that object from its flags, the conversion script's before/after report and the
benchmarks call :func:`evaluate_model` directly. Tables and plots of the report: :mod:`opdlm_trl.eval.report`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ..autoregressive import autoregressive_greedy
from ..data import (
    default_model_dir,
    humaneval_prompt_dataset,
    load_prompt_dataset,
    parse_chat_template_kwargs,
    tokenize_prompts,
)
from ..diagnostics import OWN_TEXT_NOTE, OffsetConfidence, OracleCeiling, out_of_order_commits, teacher_top1_logprob
from ..likelihood import loglikelihood
from ..masks import round_up_to_block
from ..modeling import diffusion_settings, load_diffusion_model, unwrap_model
from ..sampling import COMMIT_RULES, DiffusionSampler, SamplerConfig, default_stop_token_ids
from ..teachers import LocalTeacher, TeacherBackend
from .metrics import pass_at_1, scores_from_targets, tokens_per_forward
from .placement import resolve_device, resolve_dtype
from .report import TEACHER_SYSTEM, plot_sweep, student_system, sweep_rows, sweep_system

__all__ = [
    "DECODINGS",
    "DEFAULT_SWEEP",
    "EMBEDDED",
    "HUMANEVAL",
    "EvalSettings",
    "evaluate_model",
    "teacher_oracle_ceiling",
    "threshold_sweep",
]

DECODINGS = ("static", "dynamic")
DEFAULT_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
HUMANEVAL = "humaneval"
EMBEDDED = "embedded"


# ------------------------------------------------------------------------------------------ settings


@dataclass
class EvalSettings:
    """What :func:`evaluate_model` runs and how; every field is checked when the object is made, before any model
    loads. The ``opdlm-eval`` flags take their defaults from here, so the API and the command line cannot drift.

    Attributes:
        dataset: ``"humaneval"`` (:func:`opdlm_trl.data.humaneval_prompt_dataset` with ``split``,
            ``heldout_size``, ``seed``), a local file/folder or hub name (:func:`opdlm_trl.data.load_prompt_dataset`),
            or a ``datasets.Dataset`` with a ``prompt`` column. pass@1 is computed when it also has ``test`` and
            ``entry_point`` columns.
        split / heldout_size / seed: the dataset split (HumanEval: ``"heldout"`` or ``"train"``, split by ``seed``).
        limit: evaluate the first ``limit`` prompts only.
        max_prompt_length: keep the last N tokens of longer prompts.
        chat_template_kwargs: chat-template variables for conversational prompts, e.g. ``{"enable_thinking":
            False}`` for Qwen3's non-thinking mode (a JSON string works too); use the training run's value so the
            student is evaluated on the prompts it was trained on.
        max_new_tokens: completion budget of every system; rounded up to whole student blocks.
        block_size: student decoding block (default: the student's own ``config.opdlm.block_size``).
        decodings: student decodings to run: ``"static"`` (one token per step, the paper's evaluation setting)
            and/or ``"dynamic"`` (threshold, Fast-dLLM style).
        threshold: confidence threshold of ``dynamic`` decoding.
        thresholds: a threshold sweep: ``dynamic`` decoding runs once per threshold (rows ``student_dynamic@<t>``,
            :func:`opdlm_trl.eval.report.sweep_system`) instead of once at ``threshold``. Stored sorted.
        commit_orders: the commit rules to run every student decoding with (names registered in
            :data:`opdlm_trl.sampling.COMMIT_RULES`: ``"confidence"``, ``"left_to_right"``, or one added with
            :func:`opdlm_trl.sampling.register_commit_rule`); rows of a rule other than the sampler's default carry
            its name as a suffix (:func:`opdlm_trl.eval.report.student_system`). Each student row reports its
            ``commit_order``, ``out_of_order_rate`` (the fraction of its commits made right of a still-masked
            position) and, with a teacher, ``own_text_oracle_ceiling``: the chain bound on its own text at the
            sweep's thresholds (what a perfectly distilled student could reach on the text this student writes,
            beside the teacher-text ``oracle_ceiling``).
        teacher_generate: also decode the teacher greedily (the ``teacher_ar`` reference row); without, the
            teacher only scores.
        confidence: also report each student row's confidence by frontier offset (``confidence_by_offset``; the
            sampler records every step's logits, one batch at a time).
        batch_size: prompts decoded (and scored) per batch.
        device / dtype: where and in which precision the student and teacher run (:mod:`opdlm_trl.eval.placement`:
            default CUDA when available, else CPU; ``"auto"`` = bfloat16 on CUDA, float32 on CPU). A student given
            as a model object stays where it is unless ``device`` is set; the teacher joins the student.
        timeout / runner: seconds per HumanEval test run and the code runner
            (:data:`opdlm_trl.eval.metrics.RUNNERS`).
        keep_samples: keep every system's per-prompt output in the report.
    """

    dataset: Any = HUMANEVAL
    split: str = "heldout"
    heldout_size: int = 100
    seed: int = 0
    limit: int | None = None
    max_prompt_length: int | None = None
    chat_template_kwargs: dict[str, Any] | str | None = None
    max_new_tokens: int = 128
    block_size: int | None = None
    decodings: Sequence[str] = DECODINGS
    threshold: float = 0.9
    thresholds: Sequence[float] | None = None
    commit_orders: Sequence[str] = (SamplerConfig.commit_order,)
    teacher_generate: bool = True
    confidence: bool = False
    batch_size: int = 8
    device: str | None = None
    dtype: str | torch.dtype = "auto"
    timeout: float = 10.0
    runner: str = "auto"
    keep_samples: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.decodings) - set(DECODINGS)
        if unknown:
            raise ValueError(f"Unknown decoding(s) {sorted(unknown)}; choose from {DECODINGS}.")
        self.decodings = list(self.decodings)
        self.thresholds = _sweep_thresholds(self.thresholds, self.decodings)
        self.commit_orders = _commit_orders(self.commit_orders)
        self.chat_template_kwargs = parse_chat_template_kwargs(self.chat_template_kwargs)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")

    @classmethod
    def of(cls, settings: EvalSettings | None = None, **options: Any) -> EvalSettings:
        """``settings`` (default: all defaults) with ``options`` (field names) replacing fields; a name that is not a
        field is refused, listing the fields."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"Unknown evaluation setting(s) {unknown}; EvalSettings fields: {sorted(names)}.")
        return replace(settings, **options) if settings is not None else cls(**options)


def _sweep_thresholds(thresholds: Sequence[float] | None, decodings: Sequence[str]) -> list[float] | None:
    """Validated, sorted, de-duplicated sweep thresholds (``None`` = no sweep)."""
    if thresholds is None:
        return None
    values = sorted({float(t) for t in thresholds})
    if not values:
        raise ValueError("thresholds is empty: pass at least one threshold, or None for the single `threshold`.")
    bad = [t for t in values if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"Sweep thresholds must be probabilities in [0, 1], got {bad}.")
    if "dynamic" not in decodings:
        raise ValueError("A threshold sweep runs dynamic decoding: include 'dynamic' in decodings.")
    return values


def _commit_orders(commit_orders: Sequence[str]) -> list[str]:
    """Validated, de-duplicated commit rules, in the order given (names registered in the sampler)."""
    orders = list(dict.fromkeys(commit_orders))
    unknown = [order for order in orders if order not in COMMIT_RULES]
    if unknown or not orders:
        raise ValueError(
            f"commit_orders must be a non-empty selection of the registered commit rules {tuple(COMMIT_RULES)} "
            f"(add one with opdlm_trl.sampling.register_commit_rule), got {list(commit_orders)}."
        )
    return orders


# ------------------------------------------------------------------------------------------ loading


def _load_student(student, tokenizer, device, dtype):
    """The student on ``device`` in ``dtype`` (a model object is moved only when a device is asked for)."""
    if isinstance(student, str):
        place = resolve_device(device)
        model, loaded_tokenizer = load_diffusion_model(student, dtype=resolve_dtype(dtype, place))
        return model.to(place).eval(), tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("Pass `tokenizer=` (the student's, with its mask token) when `student` is a model object.")
    diffusion_settings(student)  # a clear error if it was never converted
    if device is not None:
        student = student.to(resolve_device(device))
    return student.eval(), tokenizer


def _teacher_roles(teacher, student) -> tuple[Any, contextlib.AbstractContextManager]:
    """``(scorer, writer)`` of a teacher given as a path (``"embedded"``: the packaged SmolLM2), a causal LM or a
    :class:`opdlm_trl.teachers.TeacherBackend`: what scores every system's tokens, and a context yielding the causal
    LM that writes the teacher's own greedy answers (None: a backend that only scores, such as a vLLM server).

    A path or model is placed beside the student (its device; a path also in its dtype) and scored by a
    :class:`~opdlm_trl.teachers.LocalTeacher`; a backend (e.g. a trainer's ``teacher``) is used where it is.
    """
    if teacher is None:
        return None, contextlib.nullcontext()
    if isinstance(teacher, TeacherBackend):
        return teacher, teacher.causal_lm()
    if not isinstance(teacher, str | torch.nn.Module):
        raise TypeError(
            "teacher must be a path, a causal LM or an opdlm_trl.teachers.TeacherBackend (e.g. a trainer's teacher), "
            f"got {type(teacher).__name__}."
        )
    place = next(unwrap_model(student).parameters())
    if isinstance(teacher, str):
        from transformers import AutoModelForCausalLM

        path = default_model_dir() if teacher == EMBEDDED else teacher
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=place.dtype, attn_implementation="sdpa")
    model = teacher.to(place.device).eval()
    return LocalTeacher(model), contextlib.nullcontext(model)


def _load_prompts(dataset, split: str, heldout_size: int, seed: int, limit: int | None):
    if isinstance(dataset, str) and dataset == HUMANEVAL:
        rows = humaneval_prompt_dataset(split, heldout_size=heldout_size, seed=seed)
    elif isinstance(dataset, str):
        rows = load_prompt_dataset(dataset, split=split)
    else:
        rows = dataset
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return rows


def evaluation_prompts(settings: EvalSettings, tokenizer) -> tuple[Any, list[list[int]]]:
    """The prompt rows and their token ids that :func:`evaluate_model` decodes under ``settings``.

    One rule for both: a record's texts can then be re-scored against exactly the prompts they answered."""
    rows = _load_prompts(settings.dataset, settings.split, settings.heldout_size, settings.seed, settings.limit)
    prompts = tokenize_prompts(rows, tokenizer, settings.max_prompt_length, "left", settings.chat_template_kwargs)
    return rows, prompts


# ------------------------------------------------------------------------------------------ systems


def _new_record() -> dict[str, Any]:
    return {
        "texts": [], "nll_sum": 0.0, "agree": 0, "scored": 0, "tokens": 0, "forwards": 0, "nfe": 0, "seconds": 0.0,
        "out_of_order": 0, "commits": 0, "sample_scores": [],
    }  # fmt: skip


def _add_scores(record: dict[str, Any], teacher, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Pool the teacher's NLL / agreement into ``record``; returns the (top-1) targets, or None without teacher."""
    if teacher is None:
        return None
    targets = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, 1)
    scores = scores_from_targets(targets, completion_ids)
    record["nll_sum"] += scores["nll_sum"]
    record["agree"] += scores["agree_count"]
    record["scored"] += scores["tokens"]
    record["sample_scores"] += [
        {"nll_sum": nll_sum, "tokens": int(tokens)}
        for nll_sum, tokens in zip(scores["sequence_nll_sum"], scores["sequence_tokens"], strict=True)
    ]
    return targets


def _run_student(
    student,
    tokenizer,
    prompts,
    decoding,
    settings,
    teacher,
    batch_size,
    confidence: OffsetConfidence | None = None,
    own_ceiling: OracleCeiling | None = None,
) -> dict[str, Any]:
    """Greedy diffusion decoding of every prompt; forwards counted per row (its denoising steps).

    ``settings``: :class:`opdlm_trl.sampling.SamplerConfig` fields (``commit_order`` among them). Every batch's
    out-of-order commits are counted; with ``own_ceiling`` (and a teacher) the chain bound is pooled over the
    student's own text. With ``confidence`` the sampler records each step's logits and the tally reads them per
    batch (frontier-offset confidence, :mod:`opdlm_trl.diagnostics`); the records are dropped after.
    """
    sampler = DiffusionSampler(
        SamplerConfig(remasking=decoding, **settings),
        pad_token_id=tokenizer.pad_token_id,
        record_logits=confidence is not None,
    )
    record = _new_record()
    for start in range(0, len(prompts), batch_size):
        began = time.perf_counter()
        rollout = sampler.sample(student, prompts[start : start + batch_size])
        record["seconds"] += time.perf_counter() - began
        record["texts"].extend(rollout.texts(tokenizer))
        record["tokens"] += int(rollout.completion_mask.sum())
        record["forwards"] += int(rollout.block_steps.sum())
        record["nfe"] += rollout.nfe
        out_of_order, commits = out_of_order_commits(rollout.step_map, rollout.completion_mask, rollout.block_size)
        record["out_of_order"] += out_of_order
        record["commits"] += commits
        targets = _add_scores(
            record, teacher, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
        )
        if own_ceiling is not None and targets is not None:
            own_ceiling.add(targets.token_logprobs.cpu(), targets.mask.cpu())
        if confidence is not None:
            top1 = None if targets is None else teacher_top1_logprob(targets.top_logprobs, targets.full_logprobs)
            confidence.add_records(
                sampler.records, rollout, None if top1 is None else top1.exp(), diffusion_settings(student)
            )
            sampler.records = []
    if confidence is not None:
        record["confidence_by_offset"] = confidence.summary()
    if own_ceiling is not None and own_ceiling.tokens:
        record["own_text_oracle_ceiling"] = own_ceiling
    return record


@torch.no_grad()
def _run_teacher(
    teacher,
    tokenizer,
    prompts,
    max_new_tokens: int,
    batch_size: int,
    scorer,
    stop_ids: Sequence[int],
    ceiling: OracleCeiling | None = None,
) -> dict[str, Any]:
    """Greedy HF ``generate`` of the AR teacher (one forward per generated token by construction).

    ``ceiling`` pools the chain-bound oracle over the same greedy text and its teacher scores.
    """
    record = {**_new_record(), "token_ids": []}
    for start in range(0, len(prompts), batch_size):
        began = time.perf_counter()
        prompt_ids, prompt_mask, completion_ids, completion_mask = autoregressive_greedy(
            teacher, prompts[start : start + batch_size], tokenizer.pad_token_id, max_new_tokens, stop_ids
        )
        record["seconds"] += time.perf_counter() - began
        token_ids = [row[mask.bool()].tolist() for row, mask in zip(completion_ids, completion_mask, strict=True)]
        record["token_ids"].extend(token_ids)
        record["texts"].extend(tokenizer.batch_decode(token_ids, skip_special_tokens=True))
        tokens = int(completion_mask.sum())
        record["tokens"] += tokens
        record["forwards"] += tokens
        record["nfe"] += completion_ids.shape[1]
        targets = _add_scores(record, scorer, prompt_ids, prompt_mask, completion_ids, completion_mask)
        if ceiling is not None and targets is not None:
            ceiling.add(targets.token_logprobs.cpu(), targets.mask.cpu())
    return record


def _student_nll(student, tokenizer, prompts, completions, batch_size: int, block_size: int | None) -> float | None:
    """The student's exact left-to-right NLL per token of given completions (:mod:`opdlm_trl.likelihood`).

    On the teacher's greedy answers it says how well the student models what the teacher writes, in the same
    unit as the teacher's own NLL of its text (lower = closer), independent of the student's decoding.
    """
    pairs = [(list(prompt), completion) for prompt, completion in zip(prompts, completions, strict=True) if completion]
    if not pairs:
        return None
    totals = loglikelihood(student, pairs, tokenizer.pad_token_id, batch_size, block_size)
    return -sum(total for total, _ in totals) / sum(len(completion) for _, completion in pairs)


def _summary(record: dict[str, Any], passed: list[dict[str, Any]] | None, num_prompts: int) -> dict[str, Any]:
    nan = float("nan")
    return {
        "pass_at_1": (sum(o["passed"] for o in passed) / len(passed)) if passed else None,
        "teacher_nll_per_token": record["nll_sum"] / record["scored"] if record["scored"] else None,
        "top1_agreement": record["agree"] / record["scored"] if record["scored"] else None,
        "tokens_per_forward": tokens_per_forward(record["tokens"], record["forwards"]),
        "completion_tokens": record["tokens"],
        "mean_completion_tokens": record["tokens"] / num_prompts if num_prompts else nan,
        "forwards": record["forwards"],
        "batch_nfe": record["nfe"],
        "seconds": record["seconds"],
        "tokens_per_second": record["tokens"] / record["seconds"] if record["seconds"] else nan,
    }


# ------------------------------------------------------------------------------------------ API


def evaluate_model(
    student, teacher=None, settings: EvalSettings | None = None, *, tokenizer=None, **options: Any
) -> dict[str, Any]:
    """Evaluate a diffusion student (and its AR teacher) on a prompt set; returns a JSON-ready dict.

    Args:
        student: a converted student directory (:func:`opdlm_trl.load_diffusion_model`) or model object (then
            pass ``tokenizer``, the student's, with its mask token).
        teacher: the AR teacher: a directory (``"embedded"``: :func:`opdlm_trl.data.default_model_dir`), a causal
            LM, or a :class:`opdlm_trl.teachers.TeacherBackend` such as a trainer's ``teacher`` (a vLLM backend
            scores but writes no answers). It scores every system's output (teacher NLL, top-1 agreement) and,
            with ``settings.teacher_generate``, is itself decoded greedily as the AR reference row. ``None`` skips
            both.
        settings: what to run (:class:`EvalSettings`; default: all defaults).
        options: :class:`EvalSettings` fields replacing those of ``settings``, e.g. ``max_new_tokens=64``.

    Returns:
        ``{"settings", "num_prompts", "results": {system: metrics}, "samples": [...]}`` with systems
        ``student_static``, ``student_dynamic`` and ``teacher_ar``; with dynamic decoding and the AR
        teacher run also ``oracle_ceiling`` (the chain bound, :mod:`opdlm_trl.diagnostics`), and
        ``sweep``: one row per dynamic threshold (:func:`opdlm_trl.eval.report.sweep_rows`). The
        ``teacher_ar`` row also carries ``student_nll_per_token``: the student's exact left-to-right NLL of the
        teacher's greedy answers (:func:`opdlm_trl.likelihood.loglikelihood`).
    """
    settings = EvalSettings.of(settings, **options)  # every setting is checked before any model loads
    student, tokenizer = _load_student(student, tokenizer, settings.device, settings.dtype)
    scorer, writer = _teacher_roles(teacher, student)
    rows, prompts = evaluation_prompts(settings, tokenizer)
    block_size = settings.block_size or diffusion_settings(student).block_size
    max_new_tokens = round_up_to_block(settings.max_new_tokens, block_size)
    threshold, sweep, batch_size = settings.threshold, settings.thresholds, settings.batch_size

    sampling = {"block_size": settings.block_size, "max_new_tokens": max_new_tokens, "threshold": threshold}
    # the package's one stop rule (tokenizer + the student's generation_config), for every system alike
    sampling["stop_token_ids"] = default_stop_token_ids(tokenizer, student)
    records = {}
    for name, decoding, run_threshold, order in _student_systems(
        settings.decodings, threshold, sweep, settings.commit_orders
    ):
        tally = OffsetConfidence() if settings.confidence else None
        own_ceiling = OracleCeiling([block_size], sweep or [threshold], note=OWN_TEXT_NOTE) if scorer else None
        run_settings = {**sampling, "threshold": run_threshold, "commit_order": order}
        records[name] = _run_student(
            student, tokenizer, prompts, decoding, run_settings, scorer, batch_size, tally, own_ceiling
        )
        records[name]["commit_order"] = order
        if decoding == "dynamic":
            records[name]["threshold"] = run_threshold
    ceiling = OracleCeiling([block_size], sweep or [threshold]) if "dynamic" in settings.decodings else None
    with writer as teacher_model:
        if teacher_model is not None and settings.teacher_generate:
            records[TEACHER_SYSTEM] = _run_teacher(
                teacher_model, tokenizer, prompts, max_new_tokens, batch_size, scorer, sampling["stop_token_ids"],
                ceiling,
            )  # fmt: skip

    has_tests = {"test", "entry_point"} <= set(rows.column_names)
    problems = [rows[i] for i in range(len(rows))] if has_tests else None
    outcomes = {
        name: pass_at_1(problems, record["texts"], timeout=settings.timeout, runner=settings.runner)[1]
        if has_tests
        else None
        for name, record in records.items()
    }
    results = {name: _summary(record, outcomes[name], len(prompts)) for name, record in records.items()}
    if TEACHER_SYSTEM in records:
        results[TEACHER_SYSTEM]["student_nll_per_token"] = _student_nll(
            student, tokenizer, prompts, records[TEACHER_SYSTEM]["token_ids"], batch_size, settings.block_size
        )
    ceiling = ceiling if ceiling is not None and ceiling.tokens else None
    _add_diagnostics(results, records, ceiling, block_size)
    diagnostics = {"oracle_ceiling": ceiling.as_dict()} if ceiling is not None else {}
    if any("threshold" in record for record in records.values()):
        diagnostics["sweep"] = sweep_rows({"results": results})
    return {
        "settings": _reported_settings(settings, student, max_new_tokens, block_size),
        "num_prompts": len(prompts),
        "results": results,
        **diagnostics,
        "samples": _samples(rows, records, outcomes) if settings.keep_samples else [],
    }


def _reported_settings(settings: EvalSettings, student, max_new_tokens: int, block_size: int | None) -> dict:
    """The report's ``settings``: what was asked for, with what the student resolved it to (block, budget,
    placement)."""
    place = next(unwrap_model(student).parameters())
    return {
        "dataset": settings.dataset if isinstance(settings.dataset, str) else "<Dataset>",
        "split": settings.split,
        "limit": settings.limit,
        "max_new_tokens": max_new_tokens,
        "block_size": block_size,
        "threshold": settings.threshold,
        "decodings": settings.decodings,
        "thresholds": settings.thresholds,
        "commit_orders": settings.commit_orders,
        "chat_template_kwargs": settings.chat_template_kwargs,
        "batch_size": settings.batch_size,
        "shift": diffusion_settings(student).shift,
        "device": str(place.device),
        "dtype": str(place.dtype).removeprefix("torch."),
        "temperature": 0.0,
    }


def _student_systems(
    decodings, threshold: float, sweep: list[float] | None, commit_orders: Sequence[str]
) -> list[tuple[str, str, float, str]]:
    """``(row name, decoding, threshold, commit order)`` of every student run: per commit order, one per decoding
    and one per sweep threshold."""
    systems = []
    for order in commit_orders:
        for decoding in decodings:
            if decoding == "dynamic" and sweep is not None:
                systems.extend((sweep_system(value, order), decoding, value, order) for value in sweep)
            else:
                systems.append((student_system(decoding, order), decoding, threshold, order))
    return systems


def _add_diagnostics(results, records, ceiling: OracleCeiling | None, block_size: int | None) -> None:
    """Student rows get their ``commit_order``, ``out_of_order_rate`` and (with a teacher) the chain bound on their
    own text (``own_text_oracle_ceiling``: ``{threshold: ceiling}`` at the sweep's thresholds); dynamic rows their
    ``threshold`` and the teacher-text ``oracle_ceiling`` there; rows with a tally their offsets."""
    for name, record in records.items():
        if "commit_order" in record:
            results[name]["commit_order"] = record["commit_order"]
            commits = record["commits"]
            results[name]["out_of_order_rate"] = record["out_of_order"] / commits if commits else None
        if "own_text_oracle_ceiling" in record:
            own = record["own_text_oracle_ceiling"]
            results[name]["own_text_oracle_ceiling"] = {f"{t:g}": own.ceiling(block_size, t) for t in own.thresholds}
        if "threshold" in record:
            results[name]["threshold"] = record["threshold"]
            results[name]["oracle_ceiling"] = ceiling.ceiling(block_size, record["threshold"]) if ceiling else None
        if "confidence_by_offset" in record:
            results[name]["confidence_by_offset"] = record["confidence_by_offset"]


def _samples(rows, records, outcomes) -> list[dict[str, Any]]:
    identifiers = rows["task_id"] if "task_id" in rows.column_names else list(range(len(rows)))
    samples = []
    for index, identifier in enumerate(identifiers):
        sample = {"id": identifier, "outputs": {name: record["texts"][index] for name, record in records.items()}}
        # each system's teacher NLL of this prompt's text (a sum over its tokens): two records can then be compared
        # prompt by prompt (paired), which separates a real change from which prompts happened to go well
        scores = {name: record["sample_scores"][index] for name, record in records.items() if record["sample_scores"]}
        if scores:
            sample["teacher_scores"] = scores
        if any(value is not None for value in outcomes.values()):
            sample["passed"] = {name: value[index]["passed"] for name, value in outcomes.items() if value is not None}
        samples.append(sample)
    return samples


# ------------------------------------------------------------------------------------------ diagnostics runs


@torch.no_grad()
def teacher_oracle_ceiling(
    teacher,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    block_sizes: Iterable[int | None] = (4,),
    thresholds: Iterable[float] = DEFAULT_SWEEP,
    batch_size: int = 8,
    stop_token_ids: Sequence[int] | None = None,
) -> OracleCeiling:
    """Generate the teacher's greedy completions (HF ``generate``), score them, pool the chain bound.

    ``teacher`` is an HF causal LM; ``prompts`` token-id lists (e.g. :func:`opdlm_trl.data.tokenize_prompts`).
    Stop tokens default to :func:`opdlm_trl.sampling.default_stop_token_ids`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    stop_ids = list(stop_token_ids) if stop_token_ids is not None else default_stop_token_ids(tokenizer)
    scorer, tally = LocalTeacher(teacher), OracleCeiling(block_sizes, thresholds)
    for start in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask, completion_ids, completion_mask = autoregressive_greedy(
            teacher, prompts[start : start + batch_size], tokenizer.pad_token_id, max_new_tokens, stop_ids
        )
        targets = scorer.score(prompt_ids, prompt_mask, completion_ids, completion_mask, 1)
        tally.add(targets.token_logprobs.cpu(), targets.mask.cpu())
    return tally


def threshold_sweep(
    student,
    teacher=None,
    thresholds: Sequence[float] = DEFAULT_SWEEP,
    plot: str | None = None,
    settings: EvalSettings | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Dynamic decoding at each threshold beside the AR teacher and the oracle ceiling (one report).

    A thin layer over :func:`evaluate_model` (``settings`` / ``options`` go there; without ``settings`` only
    ``decodings=("dynamic",)``): the report's ``sweep`` lists one row per threshold
    (:func:`opdlm_trl.eval.report.sweep_rows`); ``plot`` also writes
    :func:`opdlm_trl.eval.report.plot_sweep`'s PNG there.
    """
    if settings is None:
        options.setdefault("decodings", ("dynamic",))
    report = evaluate_model(student, teacher, settings, thresholds=thresholds, **options)
    if plot:
        plot_sweep(report, plot)
    return report
