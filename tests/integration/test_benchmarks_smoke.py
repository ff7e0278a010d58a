"""CI smoke of the benchmark scripts (``benchmarks/``) and of the experiments' own scripts (``experiments/<name>/``):
each ``--smoke`` run (tiny local models) writes JSON with finite numbers.

The scripts run as subprocesses exactly as a user starts them, so argument parsing, output writing and
imports are covered, not only the functions behind them.

Each launch costs 6-40 CPU-seconds (a fresh interpreter importing torch, transformers and TRL, then the run), so
those tests are marked ``slow``: CI runs them, the developers' ``pytest -m "not slow"`` loop does not.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
LEVERS = ROOT / "experiments" / "levers"


def _numbers(value, path: str = ""):
    """Every (path, number) leaf of a JSON document (booleans are not numbers here)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


def _run(script: str, *arguments: str, folder: Path = BENCHMARKS, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(folder / script), "--smoke", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _assert_finite(document) -> int:
    leaves = list(_numbers(document))
    bad = [(path, value) for path, value in leaves if not math.isfinite(value)]
    assert not bad, f"non-finite numbers: {bad[:10]}"
    return len(leaves)


OTHER_SCRIPTS = [
    name for name in ("decode.py", "teacher.py", "train_step.py", "loglikelihood.py") if (BENCHMARKS / name).exists()
]


@pytest.mark.slow
@pytest.mark.parametrize("script", OTHER_SCRIPTS)
def test_benchmark_smoke_writes_finite_json(script, tmp_path):
    output = tmp_path / "out.json"
    _run(script, "--output", str(output))
    assert output.exists()
    assert _assert_finite(json.loads(output.read_text())) > 0


@pytest.mark.slow
def test_lora_decode_smoke_times_every_configuration_at_equal_forwards(tmp_path):
    output = tmp_path / "lora_decode.json"
    _run("lora_decode.py", "--output", str(output))
    results = json.loads(output.read_text())["results"]
    assert [r["configuration"] for r in results] == [
        "plain", "lora, rows rebuilt", "lora, rows merged", "lora without mask row", "lora merged into weights",
    ]  # fmt: skip
    assert len({r["nfe"] for r in results}) == 1, "static decoding without stops: the same forwards everywhere"
    assert results[0]["vs_plain"] == 1.0 and all(r["seconds"] > 0 for r in results)


@pytest.mark.slow
def test_token_efficiency_smoke(tmp_path):
    _run("token_efficiency.py", "--out-dir", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {record["method"] for record in results["records"]}
    assert methods == {"init", "opd", "opd_random_remask", "offpolicy_kd", "sft_teacher", "mdlm_raw"}
    trained = [record for record in results["records"] if record["method"] != "init"]
    assert sorted({record["budget"] for record in trained}) == [16, 32]
    for record in trained:  # evaluated once the budget is crossed, never before
        assert record["training_tokens"] >= record["budget"]
        for decoding in ("static", "dynamic"):
            scores = record[decoding]
            assert scores["teacher_nll_per_token"] > 0 and 0 <= scores["top1_agreement"] <= 1
            assert scores["tokens_per_forward"] >= 1
            # the chain bound on the student's own text, and the share of its commits out of reading order
            assert all(value >= 1.0 for value in scores["own_text_oracle_ceiling"].values())
            assert 0.0 <= scores["out_of_order_rate"] <= 1.0
    assert results["teacher"]["tokens_per_forward"] == 1.0
    ceiling = results["teacher"]["oracle_ceiling"]["by_block"]["4"]  # the parallel-decoding ceiling, recorded
    assert all(value >= 1.0 for value in ceiling.values())
    assert results["teacher_data"]["teacher_generation_tokens"] > 0
    _assert_finite({key: value for key, value in results.items() if key != "summary"})
    assert (tmp_path / "token_efficiency.png").stat().st_size > 0
    assert "Tokens to reach a fraction of the teacher" in (tmp_path / "token_efficiency.md").read_text()


@pytest.mark.slow
def test_token_efficiency_lanes_merge(tmp_path):
    """Lanes (as the CPU grid script runs them) merge into one table; dynamic only at the last budget."""
    init, lane_a, lane_b, merged = tmp_path / "init", tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    _run("token_efficiency.py", "--init-only", "--out-dir", str(init))
    assert [r["method"] for r in json.loads((init / "results.json").read_text())["records"]] == ["init"]
    _run("token_efficiency.py", "--methods", "opd", "--no-init", "--dynamic-budgets", "last", "--out-dir", str(lane_a))
    _run("token_efficiency.py", "--methods", "mdlm_raw", "--no-init", "--out-dir", str(lane_b))
    lane_b_records = json.loads((lane_b / "results.json").read_text())["records"]
    assert {r["method"] for r in lane_b_records} == {"mdlm_raw"}  # --no-init: no 0-token rows
    lanes = [str(init), str(lane_a), str(lane_b), str(tmp_path / "missing")]
    _run("token_efficiency.py", "--merge", *lanes, "--out-dir", str(merged))
    results = json.loads((merged / "results.json").read_text())
    assert {(r["method"], r["budget"]) for r in results["records"]} == {
        ("init", 0),
        ("opd", 16),
        ("opd", 32),
        ("mdlm_raw", 16),
        ("mdlm_raw", 32),
    }
    opd = {r["budget"]: r for r in results["records"] if r["method"] == "opd"}
    assert opd[16]["dynamic"] == {} and opd[32]["dynamic"]["tokens_per_forward"] >= 1
    assert results["teacher"]["tokens_per_forward"] == 1.0
    assert sorted(results["config"]["methods"]) == ["mdlm_raw", "opd"]
    assert (merged / "token_efficiency.png").stat().st_size > 0


def test_token_targets_on_a_constructed_table():
    """Tokens to reach 90% / 80% of the teacher, the ratio to OPD and its lower bound, the pass@1 noise floor."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("opdlm_token_efficiency", BENCHMARKS / "token_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(method, budget, top1, nll, passed):
        scores = {"top1_agreement": top1, "teacher_nll_per_token": nll, "pass_at_1": passed}
        return {"method": method, "shift": True, "seed": 0, "budget": budget, "static": scores, "dynamic": {}}

    results = {
        "config": {"eval_prompts": 100},
        "teacher": {"pass_at_1": 0.01, "teacher_nll_per_token": 0.2, "top1_agreement": 1.0},
        "records": [
            record("opd", 256, 0.85, 0.30, 0.02),
            record("opd", 1024, 0.95, 0.21, 0.05),
            record("mdlm_raw", 256, 0.50, 1.00, 0.01),
            record("mdlm_raw", 1024, 0.70, 0.50, 0.00),
        ],
    }
    table = module.summary(results)
    entry = lambda method, metric, fraction: table[f"{method}|shift=1|static|{metric}|{fraction}"]  # noqa: E731
    assert entry("opd", "top1_agreement", 0.9)["tokens"] == 1024
    assert entry("opd", "top1_agreement", 0.8)["tokens"] == 256
    assert entry("opd", "teacher_nll_per_token", 0.9)["tokens"] == 1024  # 0.21 <= 1.1 x 0.2
    assert entry("opd", "teacher_nll_per_token", 0.8)["tokens"] == 1024  # 0.30 > 1.2 x 0.2
    mdlm = entry("mdlm_raw", "top1_agreement", 0.8)
    assert mdlm["tokens"] is None and mdlm["ratio_at_least"] == 1024 / 256
    # one teacher-solved problem out of 100 is below the noise floor: no pass@1 target for anybody
    assert entry("opd", "pass_at_1", 0.9)["tokens"] is None
    results["teacher"]["pass_at_1"] = 0.05
    assert module.summary(results)["opd|shift=1|static|pass_at_1|0.9"]["tokens"] == 1024  # 0.02 < 0.045 <= 0.05


@pytest.mark.slow
def test_train_step_paths_smoke_compares_both_length_group_settings(tmp_path):
    """The side-by-side of the previous (one padded batch) and the grouped path writes both, with speed-ups."""
    output = tmp_path / "paths.json"
    _run("train_step.py", "--batch", "5", "--compare-groups", "0", "4", "--rounds", "1", "--output", str(output))
    document = json.loads(output.read_text())
    assert _assert_finite(document) > 0
    paths = document["summary"]["paths"]
    assert set(paths) == {"0", "4"} and paths["0"]["step_speedup"] == 1.0
    assert all(row["generated_tokens_per_second"] > 0 for row in paths.values())


@pytest.mark.slow
def test_train_step_precision_smoke_times_both_and_measures_bf16_fidelity(tmp_path):
    """float32 against bf16 autocast on the same full-length rollout: both timed, and bf16 stays close."""
    output = tmp_path / "precision.json"
    _run("train_step.py", "--compare-precision", "--rounds", "1", "--output", str(output))
    document = json.loads(output.read_text())
    assert _assert_finite(document) > 0
    paths, fidelity = document["summary"]["paths"], document["summary"]["fidelity"]
    assert set(paths) == {"fp32", "bf16"} and paths["fp32"]["step_speedup"] == 1.0
    assert fidelity["student_loss"]["fp32"] != fidelity["student_loss"]["bf16"]  # bf16 did run
    assert 0 <= fidelity["teacher_kl_mean"] < 1e-2 and fidelity["gradient_cosine"] > 0.99


def test_training_curve_smoke_reads_a_log_and_writes_the_curve(tmp_path):
    _run("training_curve.py", "--out-dir", str(tmp_path), "--window", "3")
    document = json.loads((tmp_path / "curve.json").read_text())
    assert _assert_finite(document) > 0 and (tmp_path / "curve.png").stat().st_size > 0
    speed = document["series"]["rollout/tokens_per_step"]
    assert len(speed["raw"]) == len(document["training_tokens"]) == 12
    assert speed["smoothed"][2] == sum(speed["raw"][:3]) / 3  # trailing mean over the window


@pytest.mark.slow
def test_short_prompts_writes_the_training_problems_as_short_prompts(tmp_path):
    """The short-prompt lever's file: the 64 training problems, each one sentence naming its entry function, and
    the rendered prompts well under half the long ones' tokens."""
    out = tmp_path / "short.jsonl"
    summary = json.loads(_run("short_prompts.py", str(out), folder=LEVERS).stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) == 64
    first = rows[0]["prompt"][0]["content"]
    assert first.startswith("Write a Python function `def has_close_elements(") and "closer to each other" in first
    assert summary["short_mean_tokens"] < 0.5 * summary["long_mean_tokens"]


@pytest.mark.slow
def test_stdlib_prompts_are_humaneval_shaped_compilable_stubs(tmp_path):
    """The many-prompts lever's file: the 64 training problems first, then hundreds of distinct stdlib functions and
    methods, each a signature + docstring that parses as Python, in the HumanEval instruction's framing."""
    import ast

    out = tmp_path / "stdlib.jsonl"
    summary = json.loads(_run("stdlib_prompts.py", "--smoke", str(out), folder=LEVERS).stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) > 500 + 64
    assert [row["task_id"].startswith("HumanEval/") for row in rows[:65]] == [True] * 64 + [False]
    tasks = [row["task_id"] for row in rows]
    assert len(set(tasks)) == len(tasks)
    instruction = rows[0]["prompt"][0]["content"].split("\n", 1)[0]
    for row in rows[64:]:
        head, code = row["prompt"][0]["content"].split("\n```python\n", 1)
        assert head == instruction
        tree = ast.parse(code.removesuffix("```"))  # a stub with an empty body: a docstring is a valid body
        function = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef))
        assert ast.get_docstring(function)
    assert summary["max_tokens"] < 512 and summary["mean_tokens"] < summary["humaneval_mean_tokens"]


def _lever_cell(directory: Path, static_nll: float, tpf_05: float) -> None:
    """A cell directory as levers.sh leaves it: opdlm-eval's report.json and the run's opd_report.json."""
    directory.mkdir(parents=True)
    confidence = {"student_mean": [0.7, 0.3, 0.2, 0.1]}

    def decoding(tpf, nll):
        return {"tokens_per_forward": tpf, "teacher_nll_per_token": nll, "top1_agreement": 0.9,
                "confidence_by_offset": confidence}  # fmt: skip

    results = {
        "student_static": {"tokens_per_forward": 1.0, "teacher_nll_per_token": static_nll, "top1_agreement": 0.9},
        "student_dynamic@0.9": decoding(1.0, static_nll),
        "student_dynamic@0.5": decoding(tpf_05, 2 * static_nll),
        # the same cell decoded left to right (opdlm-eval's default --commit-orders evaluates both)
        "student_static_left_to_right": {
            "tokens_per_forward": 1.0,
            "teacher_nll_per_token": static_nll / 2,
            "top1_agreement": 0.9,
        },  # fmt: skip
        "student_dynamic_left_to_right@0.9": decoding(1.0, static_nll / 2),
        "student_dynamic_left_to_right@0.5": decoding(tpf_05 + 1, static_nll),
    }
    (directory / "report.json").write_text(json.dumps({"results": results}))
    history = [{"rollout/tokens_per_step": 1.0 + step / 100} for step in range(8)]
    (directory / "opd_report.json").write_text(json.dumps({"training_tokens": 1000, "log_history": history}))


def test_levers_table_rows_and_mean_over_seeds(tmp_path):
    _lever_cell(tmp_path / "plain", 0.6, 1.1)
    _lever_cell(tmp_path / "plain@2", 0.8, 1.3)
    _lever_cell(tmp_path / "other", 0.5, 1.2)
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(LEVERS / "levers_table.py"), str(tmp_path), "--json", str(summary)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "| other",
        "| plain",
        "| plain@2",
        "| plain: mean (sd) of 2 seeds",
    ]
    assert "1.02-1.07" in lines[1]  # the last 6 logged steps' training tokens/step
    plain = json.loads(summary.read_text())["plain"]["summary"]
    assert plain["seeds"] == 2 and plain["static_nll"]["mean"] == pytest.approx(0.7)
    assert plain["tpf@0.5"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    left_to_right = subprocess.run(
        [sys.executable, str(LEVERS / "levers_table.py"), str(tmp_path), "plain", "--commit-order", "left_to_right",
         "--json", str(summary)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert left_to_right.returncode == 0, left_to_right.stderr
    plain = json.loads(summary.read_text())["plain"]["summary"]
    assert plain["static_nll"]["mean"] == pytest.approx(0.35) and plain["tpf@0.5"]["mean"] == pytest.approx(2.2)


def test_quality_speed_curves_average_the_seeds_of_each_cell_and_order(tmp_path):
    _lever_cell(tmp_path / "plain", 0.6, 1.1)
    _lever_cell(tmp_path / "plain@2", 0.8, 1.3)
    out = tmp_path / "figure.png"
    records = f"{tmp_path / 'plain' / 'report.json'},{tmp_path / 'plain@2' / 'report.json'}"
    result = subprocess.run(
        [sys.executable, str(LEVERS / "quality_speed.py"), "--out", str(out), "--cell", f"plain={records}",
         "--teacher-nll", "0.2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
    curves = json.loads(out.with_suffix(".json").read_text())["curves"]
    # static, then dynamic at 0.9 and 0.5: (tokens per forward, NLL) means over the two seeds
    confidence, left_to_right = (
        sum(curves[f"plain / decoded {order}"]["points"], []) for order in ("confidence", "left_to_right")
    )
    assert confidence == pytest.approx([1.0, 0.7, 1.0, 0.7, 1.2, 1.4])
    assert left_to_right == pytest.approx([1.0, 0.35, 1.0, 0.35, 2.2, 0.7])
    assert curves["plain / decoded confidence"]["seeds"] == 2


_FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_PYTHON_LOG"
previous=""
for argument in "$@"; do [[ $previous == --output ]] && echo '{}' > "$argument"; previous=$argument; done
[[ " $* " == *" --use-cpu "* ]] && echo false
exit 0
"""


def test_levers_script_finds_the_repository_from_any_directory(tmp_path):
    """levers.sh started outside the repository (training and evaluation replaced by a recording stand-in for
    python): it runs the repository's convert.py, config and prompt-set scripts, writes each cell under OUT_DIR
    relative to where it was started, and refuses an unknown cell by name."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_PYTHON_LOG": str(log)}
    env.pop("BF16", None)
    command = [
        "bash",
        str(LEVERS / "levers.sh"),
        "out",
        "2",
        "plain",
        "short_prompts@1",
        "left_to_right+stdlib_prompts",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "training precision: bf16=false" in result.stdout
    assert (tmp_path / "out" / "plain" / "report.json").exists()
    assert (tmp_path / "out" / "short_prompts@1" / "report.json").exists()
    calls = log.read_text().splitlines()
    scripts = [argument for call in calls for argument in call.split() if argument.endswith((".py", ".yaml"))]
    assert str(ROOT / "examples" / "convert.py") in scripts and str(LEVERS / "short_prompts.py") in scripts
    assert all(Path(script).is_file() for script in scripts), scripts
    assert any("--seed 1" in call and "--dataset_name out/short_prompts.jsonl" in call for call in calls)
    # a combined cell makes both changes and writes the prompt set its part needs
    assert (tmp_path / "out" / "left_to_right+stdlib_prompts" / "report.json").exists()
    assert str(LEVERS / "stdlib_prompts.py") in scripts
    assert any(
        "--commit_order left_to_right" in call and "--dataset_name out/stdlib_prompts.jsonl" in call for call in calls
    )
    unknown = subprocess.run(command[:4] + ["no_such_cell"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown cell no_such_cell" in unknown.stderr
    unknown_part = subprocess.run(command[:4] + ["lora+nope"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert unknown_part.returncode == 2 and "unknown cell nope" in unknown_part.stderr


_RECORDING_PYTHON = """#!/usr/bin/env bash
(IFS=$'\\x1f'; printf '%s\\n' "$*") >> "$FAKE_PYTHON_LOG"
previous=""
for argument in "$@"; do [[ $previous == --output ]] && echo '{}' > "$argument"; previous=$argument; done
[[ " $* " == *" --use-cpu "* ]] && echo false
exit 0
"""


def test_every_lever_cell_is_accepted_by_the_convert_command(tmp_path):
    """Each cell's override, word-split by bash exactly as levers.sh passes it, parses into the convert command's
    arguments on top of the long recipe: a misspelt flag or a badly quoted value would otherwise fail an hour into a
    run (the cosine_lr cell's JSON kwargs, the lora cell's module list)."""
    from opdlm_trl.cli.convert import parse_args

    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(_RECORDING_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_PYTHON_LOG": str(log), "BF16": "false"}
    result = subprocess.run(
        ["bash", str(LEVERS / "levers.sh"), "out", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = [line.split("\x1f") for line in log.read_text().splitlines()]
    trainings = {Path(call[call.index("--output_dir") + 1]).name: call[1:] for call in calls if "--output_dir" in call}
    assert {"plain", "left_to_right", "cosine_lr", "lora"} <= set(trainings)
    parsed = {cell: parse_args(argv) for cell, argv in trainings.items()}
    for cell, (_, opd, _) in parsed.items():
        assert opd.max_steps == 2 and opd.output_dir.endswith(cell), cell
    assert parsed["left_to_right"][1].commit_order == "left_to_right"
    assert parsed["cosine_lr"][1].lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    lora = parsed["lora"][2]
    assert lora.use_peft and len(lora.lora_target_modules) == 7 and parsed["lora"][1].teacher_backend == "shared"


def _checkpoint(directory: Path, step: int, history: list[dict]) -> Path:
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return checkpoint


def test_levers_curve_mode_evaluates_and_prunes_checkpoints(tmp_path):
    """CURVE_EVERY keeps a checkpoint every N steps (no rotation), resumes from a seeded one, evaluates each
    earlier checkpoint on the curve (a step multiple of N) into curve/stepN.json (the final step is the cell's
    report.json) and deletes an evaluated or off-curve one once a newer exists; EVAL_ONLY=1 evaluates without
    training. Training and evaluation are a recording
    stand-in for python, which calls every checkpoint complete."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(_RECORDING_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_PYTHON_LOG": str(log), "BF16": "false", "CURVE_EVERY": "2"}
    cell = tmp_path / "out" / "left_to_right"
    for step in (2, 4, 10):  # a continued run: 10 sorts after 2 and 4 by number, not by name
        _checkpoint(cell, step, [])
    result = subprocess.run(
        ["bash", str(LEVERS / "levers.sh"), "out", "10", "left_to_right"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = [line.split("\x1f") for line in log.read_text().splitlines()]
    training = next(call for call in calls if "--output_dir" in call)
    assert training[training.index("--save_steps") + 1] == "2" and "--save_total_limit" not in training
    assert "--resume_from_checkpoint" in training
    assert sorted(path.name for path in (cell / "curve").iterdir()) == ["step2.json", "step4.json"]
    assert [path.name for path in cell.glob("checkpoint-*")] == ["checkpoint-10"]  # the newest stays
    assert (cell / "report.json").exists()
    log.write_text("")
    # a continued run keeps its first run's save_steps: 11 and 13 fall between curve points (CURVE_EVERY=2), so
    # they are never evaluated; 11 goes once a newer checkpoint exists, 13 (the newest) stays for a resume
    for step in (11, 12, 13):
        _checkpoint(cell, step, [])
    only = subprocess.run(
        ["bash", str(LEVERS / "levers.sh"), "out", "14", "left_to_right"], cwd=tmp_path,
        env={**env, "EVAL_ONLY": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert only.returncode == 0, only.stderr
    assert not any("--output_dir" in line for line in log.read_text().splitlines())  # nothing trained
    assert {path.name for path in (cell / "curve").iterdir()} == {
        "step2.json",
        "step4.json",
        "step10.json",
        "step12.json",
    }
    assert [path.name for path in cell.glob("checkpoint-*")] == ["checkpoint-13"]
    bad = subprocess.run(
        ["bash", str(LEVERS / "levers.sh"), "out", "2", "plain"], cwd=tmp_path, env={**env, "CURVE_EVERY": "x"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "CURVE_EVERY must be a positive integer" in bad.stderr


def test_levers_trained_lora_cell_is_only_evaluated(tmp_path):
    """A cell whose training ended (convert.py's opd_report.json written) but whose evaluation did not is only
    evaluated on a rerun, also a LoRA cell, which saves an adapter and no model.safetensors: keying on the full
    model's file re-ran its training from the newest checkpoint."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(_RECORDING_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_PYTHON_LOG": str(log), "BF16": "false"}
    cell = tmp_path / "out" / "lora"
    _checkpoint(cell, 2, [])
    for name in ("adapter_model.safetensors", "adapter_config.json", "opd_report.json"):
        (cell / name).write_text("{}")
    result = subprocess.run(
        ["bash", str(LEVERS / "levers.sh"), "out", "2", "lora"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert not any("--output_dir" in call for call in calls), calls  # nothing trained
    assert any("opdlm_trl.eval.cli" in call and str(Path("out") / "lora") in call for call in calls), calls
    assert (cell / "report.json").exists()


def _report(path: Path, static_nll: float, order: str = "confidence") -> None:
    """An opdlm-eval report whose rows carry their commit order, as the default order leaves them unsuffixed."""
    suffix = "" if order == "confidence" else f"_{order}"

    def row(tpf, nll):
        return {"tokens_per_forward": tpf, "teacher_nll_per_token": nll, "top1_agreement": 0.9,
                "commit_order": order, "confidence_by_offset": {"student_mean": [0.7, 0.3]}}  # fmt: skip

    results = {f"student_static{suffix}": row(1.0, static_nll)}
    results |= {f"student_dynamic{suffix}@{t:g}": row(1.0 + t, static_nll + t) for t in (0.9, 0.5)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}))


def test_curve_table_marks_the_first_drift_beyond_the_tolerance(tmp_path):
    cell = tmp_path / "left_to_right"
    history = [{"step": step, "training_tokens": 470 * step} for step in range(1, 61)]
    _checkpoint(cell, 60, history)
    for step, nll in ((20, 0.40), (40, 0.44)):
        _report(cell / "curve" / f"step{step}.json", nll, "left_to_right")
    _report(cell / "curve" / "step60.json", 0.46, "left_to_right")  # 0.06 above the best earlier: drift
    output = tmp_path / "curve.json"
    result = subprocess.run(
        [sys.executable, str(LEVERS / "curve_table.py"), str(cell), "--commit-order", "left_to_right", "--json",
         str(output)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())["rows"]
    assert [(row["step"], row["training_tokens"], row["holds"]) for row in rows] == [
        (20, 9400, True), (40, 18800, True), (60, 28200, False)
    ]  # fmt: skip
    assert "first at step 60 (0.460 against 0.400 earlier)" in result.stdout
    missing = subprocess.run(
        [sys.executable, str(LEVERS / "curve_table.py"), str(cell)], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode != 0 and "--commit-orders confidence" in missing.stderr
    figure = tmp_path / "curve.png"
    plotted = subprocess.run(
        [sys.executable, str(LEVERS / "curve_table.py"), str(cell), "--commit-order", "left_to_right", "--plot",
         str(figure), "--plot-orders", "left_to_right"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plotted.returncode == 0, plotted.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unplottable = subprocess.run(
        [sys.executable, str(LEVERS / "curve_table.py"), str(cell), "--commit-order", "left_to_right", "--plot",
         str(tmp_path / "both.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert unplottable.returncode != 0 and "--commit-orders confidence" in unplottable.stderr


@pytest.mark.slow
def test_memory_benchmark_and_model(tmp_path):
    """benchmarks/memory.py (tiny widths): every phase measured, hidden-state targets held (O(H) per token), and
    benchmarks/memory_model.py turns the cells into the per-config table."""
    _run("memory.py", "--out", str(tmp_path))
    cells = json.loads((tmp_path / "summary.json").read_text())
    assert len(cells) == 4 and all("error" not in cell for cell in cells), cells
    _assert_finite(cells)
    for cell in cells:
        hidden = cell["shape"]["hidden_size"]
        # token log-probs + mask + the (B, C, H) float32 hidden states: nothing sized by the vocabulary
        assert cell["held_targets_bytes"] == cell["generation_batch"] * cell["length"] * (4 + 1 + 4 * hidden)
        assert set(cell["phases"]) >= {"teacher", "loss", "backward"}
    table = subprocess.run(
        [sys.executable, str(BENCHMARKS / "memory_model.py"), "--measurements", str(tmp_path / "summary.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert table.count("| `") == 4 and "GiB" in table


@pytest.mark.slow
def test_synthetic_curve_smoke_records_a_curve_and_skips_complete_seeds(tmp_path):
    output = tmp_path / "curve.json"
    _run("synthetic_curve.py", "--out", str(output))
    report = json.loads(output.read_text())
    run = report["runs"]["0"]
    assert run["complete"] and [point["step"] for point in run["points"]] == [0, 1, 2]
    assert run["points"][-1]["training_tokens"] > 0
    for point in run["points"]:
        assert set(point) >= {"confidence", "left_to_right"}
        assert point["confidence"]["ceiling"] >= 1.0  # a 20-step teacher is not yet sure of anything
    _assert_finite(report["runs"])
    rerun = _run("synthetic_curve.py", "--out", str(output))
    assert "seed 0: complete" in rerun.stdout
    assert json.loads(output.read_text())["runs"] == report["runs"]


@pytest.mark.slow
def test_synthetic_curve_drift_levers_cycle_prompts_and_train_lora_only(tmp_path):
    """The drift levers of the synthetic testbed: a few training prompts cycled (forgetting) and LoRA adapters
    instead of all weights. Both are recorded in the settings, and a rerun into the same JSON with another setting
    is refused rather than mixed into the curve."""
    output = tmp_path / "lora.json"
    _run("synthetic_curve.py", "--out", str(output), "--train-prompts", "40", "--lora-rank", "4")
    report = json.loads(output.read_text())
    assert (report["settings"]["train_prompts"], report["settings"]["lora_rank"]) == (40, 4)
    assert report["runs"]["0"]["complete"] and report["runs"]["0"]["points"][-1]["training_tokens"] > 0
    _assert_finite(report["runs"])
    other = subprocess.run(
        [sys.executable, str(BENCHMARKS / "synthetic_curve.py"), "--smoke", "--out", str(output), "--lora-rank", "8"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert other.returncode != 0 and "other settings" in other.stderr


def test_memory_benchmark_writes_out_the_published_qwen3_widths():
    """benchmarks/memory.py spells Qwen3-0.6B's widths out (``--previous-code`` runs it against checkouts that may
    predate ``opdlm_trl.tiny.qwen3_config``); they must stay the published shape the memory model predicts from."""
    import importlib.util

    from opdlm_trl.tiny import qwen3_config

    spec = importlib.util.spec_from_file_location("opdlm_memory", BENCHMARKS / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    config = qwen3_config("Qwen/Qwen3-0.6B")
    assert memory.QWEN3_0_6B == dict(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab=config.vocab_size,
    )


def _scored_report(path: Path, per_prompt: list[tuple[float, int]]) -> Path:
    """An opdlm-eval report with per-prompt teacher scores of the left-to-right static row."""
    system = "student_static_left_to_right"
    nll = sum(s for s, _ in per_prompt) / sum(t for _, t in per_prompt)
    samples = [
        {"id": i, "outputs": {system: "x"}, "teacher_scores": {system: {"nll_sum": s, "tokens": t}}}
        for i, (s, t) in enumerate(per_prompt)
    ]
    path.write_text(json.dumps({"results": {system: {"teacher_nll_per_token": nll}}, "samples": samples}))
    return path


def test_paired_nll_separates_a_uniform_rise_from_one_prompt_going_badly(tmp_path):
    """Paired over prompts: every prompt a little worse is a real rise (interval above 0); the same pooled rise
    from one prompt alone is not (its interval reaches 0)."""
    base = _scored_report(tmp_path / "base.json", [(10.0 + i, 20) for i in range(24)])
    uniform = _scored_report(tmp_path / "uniform.json", [(12.0 + i, 20) for i in range(24)])
    one_prompt = _scored_report(tmp_path / "one.json", [(10.0 + i + (48.0 if i == 0 else 0.0), 20) for i in range(24)])
    out = tmp_path / "paired.json"
    result = subprocess.run(
        [sys.executable, str(LEVERS / "paired_nll.py"), str(base), str(uniform), str(one_prompt), "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    uniform_rise, one_prompt_rise = json.loads(out.read_text())
    assert uniform_rise["difference"] == pytest.approx(0.1) == one_prompt_rise["difference"]
    assert uniform_rise["base"] == str(base) and uniform_rise["base_nll"] == pytest.approx(516 / 480)
    assert uniform_rise["interval95"][0] > 0 and uniform_rise["prompts_worse"] == 24
    assert one_prompt_rise["interval95"][0] <= 0 and one_prompt_rise["prompts_worse"] == 1
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"results": {}, "samples": [{"id": 0, "outputs": {}}]}))
    refused = subprocess.run(
        [sys.executable, str(LEVERS / "paired_nll.py"), str(legacy), str(base)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "--rescore" in refused.stderr
