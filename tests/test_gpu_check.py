"""``benchmarks/gpu_check.py --dry-run``: the GPU check's every phase on a tiny model on CPU, so it does not rot
while no GPU is lent (the real run needs CUDA and is never part of CI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_phase(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--output", str(output)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"gpu_check.py --dry-run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(output.read_text())
    settings, phases = report["settings"], report["phases"]
    for name, teacher in (("opd_full", "LocalTeacher"), ("opd_lora", "SharedWeightsTeacher")):
        phase = phases[name]
        assert phase["teacher"] == teacher and phase["steps"] == settings["steps"]
        assert phase["losses"] and phase["losses_finite"] and phase["training_tokens"] > 0
        assert phase["peak_memory_mib"] is None  # only measured on CUDA
    for batch in settings["decode_batches"]:
        row = phases["sampler"][f"batch_{batch}"]
        for method in ("diffusion_static", "diffusion_dynamic", "hf_generate"):
            # stop tokens disabled: every method writes the same tokens per row, so the speeds compare
            assert row[method]["tokens"] == batch * settings["decode_tokens"]
            assert math.isfinite(row[method]["tokens_per_second"]) and row[method]["tokens_per_second"] > 0
    assert report["total_seconds"] < 120
