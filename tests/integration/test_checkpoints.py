"""Interrupted runs lose nothing: which checkpoints count as complete, and a killed run resumes bit-exactly.

The end-to-end tests kill a real training run (``tests/integration/checkpoint_worker.py``, in a subprocess, SIGKILL) once between
two checkpoints and once in the middle of writing one, resume it in this process with
``train(resume_from_checkpoint=...)`` and compare the final parameters with an uninterrupted run of the same seed:
they must be bitwise equal on CPU. That holds only because transformers restores the global RNG state (rollouts
sample at temperature 1 and states are drawn at random from it) and because the trainer's sampler repeats the
epoch order after a resume (``ResumableRepeatSampler``; TRL's own replays epoch 0's order).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trl.trainer.utils import RepeatSampler

from opdlm_trl.checkpoints import (
    IncompleteCheckpointError,
    ResumableRepeatSampler,
    check_checkpoint,
    last_complete_checkpoint,
    missing_checkpoint_files,
    resolve_resume_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
WORKER_PATH = ROOT / "tests" / "integration" / "checkpoint_worker.py"
_spec = importlib.util.spec_from_file_location("opdlm_checkpoint_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

FULL_CHECKPOINT = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")


# ------------------------------------------------------------------------------------------------- completeness
def fake_checkpoint(root: Path, step: int, files=FULL_CHECKPOINT) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}" if name.endswith(".json") else "x")
    return path


def test_a_checkpoint_with_every_file_is_complete(tmp_path):
    path = fake_checkpoint(tmp_path, 2)
    assert missing_checkpoint_files(path) == [] and check_checkpoint(path) == str(path)


@pytest.mark.parametrize("absent", FULL_CHECKPOINT)
def test_an_explicit_incomplete_checkpoint_is_refused_naming_the_missing_file(tmp_path, absent):
    path = fake_checkpoint(tmp_path, 4, [name for name in FULL_CHECKPOINT if name != absent])
    expected = "model weights" if absent == "model.safetensors" else absent
    with pytest.raises(IncompleteCheckpointError, match=rf"checkpoint-4 is incomplete.*missing {expected}"):
        check_checkpoint(path)


def test_truncated_trainer_state_and_missing_shard_are_incomplete(tmp_path):
    path = fake_checkpoint(tmp_path, 2, [name for name in FULL_CHECKPOINT if name != "model.safetensors"])
    (path / "trainer_state.json").write_text('{"global_step": 2, "log_hi')
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "model-00001-of-00002.safetensors").write_text("x")
    assert missing_checkpoint_files(path) == [
        "trainer_state.json (truncated: not valid JSON)",
        "model-00002-of-00002.safetensors",
    ]


def test_lora_deepspeed_and_weights_only_checkpoints_are_complete(tmp_path):
    lora = fake_checkpoint(
        tmp_path / "a", 1, ["trainer_state.json", "adapter_model.safetensors", *FULL_CHECKPOINT[2:]]
    )
    zero3 = fake_checkpoint(tmp_path / "b", 1, ["trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"])
    (zero3 / "global_step1").mkdir()  # DeepSpeed: weights, optimizer and its scheduler inside
    weights_only = fake_checkpoint(tmp_path / "c", 1, ["trainer_state.json", "model.safetensors"])
    assert missing_checkpoint_files(lora) == [] and missing_checkpoint_files(zero3) == []
    assert missing_checkpoint_files(weights_only) == ["optimizer.pt", "scheduler.pt", "rng_state.pth"]
    save_only_model = type("Args", (), {"save_only_model": True})()
    assert missing_checkpoint_files(weights_only, save_only_model) == []


def test_the_last_complete_checkpoint_skips_newer_incomplete_ones_with_a_warning(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, ["model.safetensors", "optimizer.pt"])  # killed while saving
    (tmp_path / "checkpoint-14").mkdir()  # killed right after creating the directory
    (tmp_path / "checkpoint-99.tmp").mkdir()  # not a checkpoint name
    with caplog.at_level(logging.WARNING, logger="opdlm_trl.checkpoints"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # numeric, not lexical, order
    skipped = [record.getMessage() for record in caplog.records]
    assert len(skipped) == 2
    assert "checkpoint-14 (missing trainer_state.json" in skipped[0]
    assert "checkpoint-12 (missing trainer_state.json, scheduler.pt, rng_state.pth)" in skipped[1]
    assert last_complete_checkpoint(tmp_path / "absent") is None


def test_resume_values_from_the_command_line_are_resolved(tmp_path):
    complete = str(fake_checkpoint(tmp_path, 3))
    for value in (True, "true", "True", "last"):
        assert resolve_resume_checkpoint(value, tmp_path) == complete
    for value in (None, False, "false", "none", ""):
        assert resolve_resume_checkpoint(value, tmp_path) is None
    assert resolve_resume_checkpoint(complete, tmp_path) == complete
    with pytest.raises(ValueError, match="holds no complete checkpoint-N directory.*Drop resume_from_checkpoint"):
        resolve_resume_checkpoint("true", tmp_path / "empty")
    with pytest.raises(IncompleteCheckpointError, match="does not exist"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-7"), tmp_path)


def test_resumable_sampler_repeats_trls_epoch_orders_from_any_epoch():
    data = list(range(10))
    stream = RepeatSampler(data, mini_repeat_count=1, batch_size=5, seed=3)
    orders = [list(stream) for _ in range(4)]  # what an uninterrupted run sees, epoch after epoch
    assert len({tuple(order) for order in orders}) == 4
    for epoch in (3, 1, 0, 2):  # a fresh sampler, as after a resume at that epoch
        resumed = ResumableRepeatSampler(data, mini_repeat_count=1, batch_size=5, seed=3)
        resumed.set_epoch(epoch)
        assert list(resumed) == orders[epoch] == list(resumed)


# ------------------------------------------------------------------------------------------------- killed runs
def final_parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def step_logs(trainer) -> dict[int, tuple]:
    """Per optimizer step: loss and rollout length (a rollout that differs changes both)."""
    return {
        entry["step"]: (entry["loss"], entry["rollout/length"], entry["supervised_per_row"])
        for entry in trainer.state.log_history
        if "loss" in entry
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = worker.build_trainer(tmp_path_factory.mktemp("uninterrupted"), save_strategy="no")
    trainer.train()
    return final_parameters(trainer), step_logs(trainer)


def run_killed(output_dir: Path, kill: str, step: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(WORKER_PATH), "--output_dir", str(output_dir), "--kill", kill]
    command += ["--kill_step", str(step), "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def resume_and_compare(output_dir: Path, resume_value, uninterrupted) -> None:
    reference_parameters, reference_logs = uninterrupted
    resumed = worker.build_trainer(output_dir)
    resumed.train(resume_from_checkpoint=resume_value)
    assert resumed.state.global_step == worker.MAX_STEPS
    logs = step_logs(resumed)
    assert logs == reference_logs and sorted(logs) == list(range(1, worker.MAX_STEPS + 1))  # restored + retrained
    parameters = final_parameters(resumed)
    assert parameters.keys() == reference_parameters.keys()
    for name, value in parameters.items():
        assert torch.equal(value, reference_parameters[name]), name


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_resumes_bit_exactly(tmp_path, uninterrupted):
    run_killed(tmp_path, "after_step", 5)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resume_and_compare(tmp_path, True, uninterrupted)  # from checkpoint-4: epoch 1, step 5


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, uninterrupted, caplog):
    run_killed(tmp_path, "while_saving", 4)
    half_written = tmp_path / "checkpoint-4"
    assert half_written.is_dir() and not (half_written / "trainer_state.json").exists()
    with pytest.raises(IncompleteCheckpointError, match="missing trainer_state.json"):
        worker.build_trainer(tmp_path).train(resume_from_checkpoint=str(half_written))
    with caplog.at_level(logging.WARNING, logger="opdlm_trl.checkpoints"):
        resume_and_compare(tmp_path, "true", uninterrupted)  # the string opdlm-convert receives; checkpoint-2
    assert any(f"Skipping incomplete checkpoint {half_written}" in r.getMessage() for r in caplog.records)


def test_opdlm_convert_resumes_with_true_from_the_command_line(tmp_path, caplog):
    """The reported case: ``--resume_from_checkpoint true`` after a kill that left checkpoint-4 without
    trainer_state.json, rng_state.pth and scheduler.pt (the CLI hands the trainer the string ``"true"``)."""
    from opdlm_trl.cli import convert
    from opdlm_trl.tiny import save_tiny_pair

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}(x):"}) + "\n" for i in range(4)))
    output_dir = tmp_path / "out"
    common = ["--model_name_or_path", save_tiny_pair(tmp_path / "model"), "--dataset_name", str(prompts)]
    common += ["--output_dir", str(output_dir), "--use_cpu", "true", "--report_to", "none", "--report_prompts", "0"]
    common += ["--per_device_train_batch_size", "2", "--max_completion_length", "4", "--save_steps", "2"]
    common += ["--logging_steps", "1"]
    convert.main([*common, "--max_steps", "4"])
    for name in ("trainer_state.json", "rng_state.pth", "scheduler.pt"):
        (output_dir / "checkpoint-4" / name).unlink()
    with caplog.at_level(logging.WARNING, logger="opdlm_trl.checkpoints"):
        convert.main([*common, "--max_steps", "6", "--resume_from_checkpoint", "true"])
    assert any("Skipping incomplete checkpoint" in record.getMessage() for record in caplog.records)
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
