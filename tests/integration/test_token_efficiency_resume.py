"""The token-efficiency benchmark resumes a killed cell from its last training checkpoint, not from step 0.

One smoke-sized OPD cell (tiny random Llama, budgets 16 and 640 training tokens: ~40 optimizer steps of 16 tokens,
a checkpoint after every step) runs three times as a subprocess, exactly as a user starts it:

1. uninterrupted (the reference);
2. killed with SIGKILL as soon as its first complete checkpoint is on disk (mid-cell: the 16-token budget may
   already be evaluated, the 640-token one is not);
3. rerun with the same ``--out-dir``: it must resume from the newest complete checkpoint the killed run left
   (recorded in ``results["resumes"]``) and finish the cell.

The resumed cell must end exactly where the reference ends (bitwise, on CPU with one thread): the same records
at every budget (training tokens, optimizer step, every evaluation score and sample), the same per-step losses and
the same final weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdlm_trl.checkpoints import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "token_efficiency.py"
CELL = "opd|shift=1|seed=0"
CELL_DIR = Path("runs") / "opd-shift1-seed0"
ARGUMENTS = ["--smoke", "--methods", "opd", "--no-init", "--budgets", "16", "640", "--save-steps", "1"]
ARGUMENTS += ["--keep-checkpoints", "--threads", "1"]
TIMEOUT_S = 300


def _command(out_dir: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), *ARGUMENTS, "--out-dir", str(out_dir)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(out_dir: Path) -> dict:
    proc = subprocess.run(_command(out_dir), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"token_efficiency.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out_dir / "results.json").read_text())


def _kill_after_first_checkpoint(out_dir: Path) -> int:
    """Start the cell, SIGKILL it once a complete checkpoint exists; the newest complete step it left behind."""
    log = open(out_dir.parent / f"{out_dir.name}.log", "w")
    proc = subprocess.Popen(_command(out_dir), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while last_complete_checkpoint(out_dir / CELL_DIR) is None:
            assert proc.poll() is None, "the cell ended before its first checkpoint was seen"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the cell finished before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    checkpoint = last_complete_checkpoint(out_dir / CELL_DIR)
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def _final_checkpoint(out_dir: Path) -> Path:
    (checkpoint,) = (out_dir / CELL_DIR).glob("checkpoint-*")  # save_total_limit=1: only the last one is left
    return checkpoint


def _step_losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def _records(results: dict) -> dict:
    """Each budget's record without its wall-clock field (the only one a resume may change)."""
    return {r["budget"]: {k: v for k, v in r.items() if k != "train_seconds"} for r in results["records"]}


@pytest.mark.slow
def test_a_killed_cell_resumes_from_its_last_checkpoint_and_ends_like_an_uninterrupted_one(tmp_path):
    reference = _run(tmp_path / "reference")
    final_step = reference["records"][-1]["steps"]
    assert sorted(_records(reference)) == [16, 640] and "resumes" not in reference

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    killed_at = _kill_after_first_checkpoint(interrupted)
    assert 1 <= killed_at < final_step
    if (interrupted / "results.json").exists():  # budgets evaluated before the kill are kept, the last one is not
        assert 640 not in _records(json.loads((interrupted / "results.json").read_text()))

    resumed = _run(interrupted)
    (resume,) = resumed["resumes"]
    assert resume["cell"] == CELL and resume["step"] == killed_at
    assert Path(resume["checkpoint"]).name == f"checkpoint-{killed_at}"

    assert _records(resumed) == _records(reference)
    got, expected = _final_checkpoint(interrupted), _final_checkpoint(tmp_path / "reference")
    assert got.name == expected.name == f"checkpoint-{final_step}"
    assert _step_losses(got) == _step_losses(expected)
    weights, reference_weights = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[name], reference_weights[name]) for name in weights)
