"""The lm-eval ``opdlm`` model data-parallel: two gloo processes under ``accelerate launch`` answer as one process.

The harness CLI runs the shipped multiple-choice task (examples/lm_eval_tasks) on a saved tiny student, once as a
plain process and once under ``accelerate launch --multi_gpu --num_processes 2`` on CPU (each process scores its
share of the documents, rank 0 gathers them). Every document's log-likelihoods and the accuracies must agree.
Each launch imports lm-eval and torch in every process (~30-60 s on 2 cores), hence the ``slow`` marker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from opdlm_trl.modeling import to_diffusion

ROOT = Path(__file__).resolve().parents[2]
TASK = "opdlm_mc_basics"
LIMIT = 8
LAUNCH_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(prefix: list[str], student: Path, out: Path) -> tuple[dict, list[dict]]:
    """Run the harness CLI through our module under ``prefix``; return rank 0's results and its gathered samples."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        *prefix, "-m", "opdlm_trl.eval.lm_eval_model", "run", "--model", "opdlm",
        "--model_args", f"pretrained={student}", "--device", "cpu", "--batch_size", "4",
        "--tasks", TASK, "--include_path", str(ROOT / "examples" / "lm_eval_tasks"), "--limit", str(LIMIT),
        "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if proc.returncode != 0 or len(results) != 1 or len(samples) != 1:
        raise AssertionError(
            f"{' '.join(command)} exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
        )
    rows = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text())["results"][TASK], sorted(rows, key=lambda row: row["doc_id"])


@pytest.mark.slow
def test_two_processes_score_like_one(tmp_path, make_model, tokenizer):
    student, student_tokenizer = to_diffusion(make_model("llama"), tokenizer, block_size=4, shift=True)
    student.save_pretrained(tmp_path / "student")
    student_tokenizer.save_pretrained(tmp_path / "student")

    single = _run([sys.executable], tmp_path / "student", tmp_path / "single")
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    double = _run(launcher, tmp_path / "student", tmp_path / "double")

    (single_results, single_rows), (double_results, double_rows) = single, double
    assert [row["doc_id"] for row in double_rows] == list(range(LIMIT)) == [row["doc_id"] for row in single_rows]
    for one, two in zip(single_rows, double_rows, strict=True):
        values = [response[0][0] for response in two["resps"]]
        assert values == pytest.approx([response[0][0] for response in one["resps"]], abs=1e-4)
    for key in ("acc,none", "acc_norm,none"):
        assert double_results[key] == single_results[key]
