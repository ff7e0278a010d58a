"""``benchmarks/gpu_check.py --dry-run``: the GPU check's every phase and verdict on tiny Qwen3 shapes on CPU (the real
Qwen3 tokenizer and vocabulary), so it does not rot while no GPU is lent (the real run needs CUDA and is never part of
CI); and ``scripts/gpu_check.sh``'s offline bundle stays within its 64 MiB."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _memory_measurements(path: Path) -> Path:
    """Cells shaped like benchmarks/memory.py's summary.json (two depths, three lengths) to calibrate the model."""
    cells = []
    for layers in (2, 4):
        for length in (500, 1000, 2000):
            peak = (2 * (128 + 2 * length)) * (40_000 * layers + 20_000) / 2**20
            cells.append(
                {
                    "code": "current", "layers": layers, "length": length, "shape": {"hidden_size": 1024},
                    "phases": {"loss": {"peak_above_start_mib": peak}, "backward": {"peak_above_start_mib": peak / 2}},
                }
            )  # fmt: skip
    path.write_text(json.dumps(cells))
    return path


@pytest.mark.slow  # the whole launched check: training, logits and decoding at Qwen3's real vocabulary
def test_gpu_check_dry_run_runs_every_phase_and_passes(tmp_path, qwen3_tokenizer_dir):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--output", str(output)]
    command += ["--tokenizer-dir", qwen3_tokenizer_dir]
    command += ["--memory-measurements", str(_memory_measurements(tmp_path / "summary.json"))]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"gpu_check.py --dry-run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(output.read_text())
    settings, phases, checks = report["settings"], report["phases"], report["checks"]
    assert report["passed"] and not any("error" in phase or "skipped" in phase for phase in phases.values())

    assert phases["environment"]["model"]["vocab_size"] == 151_936  # the real vocabulary, at tiny width
    train = phases["train"]
    assert train["teacher"] == "LocalTeacher" and train["optimizer_steps"] == settings["steps"]
    # the curriculum ramps the rollouts from min to max tokens, one measured entry per optimizer step
    lengths = [step["rollout_tokens"] for step in train["steps"]]
    assert lengths[0] == settings["min_tokens"] and lengths[-1] == settings["max_tokens"]
    assert train["trainable_dtypes"] == ["torch.float32"] and min(train["weights_changed"].values()) > 0
    assert all(math.isfinite(loss) for loss in train["losses"]) and len(train["losses"]) == settings["steps"]
    # the training forward (with grad) passes the 4D block-causal mask to SDPA; its kernel is named
    assert any(kind.startswith("grad/mask=") for kind in train["sdpa"]) and train["training_sdpa_kernels"]
    # benchmarks/memory_model.py's prediction for this run's shape; GPU memory itself is only measured on CUDA
    assert train["prediction"]["why"] == "benchmarks/memory_model.py" and train["prediction"]["predicted_gib"] > 0
    assert train["peak_gib"] is None

    assert phases["logits"]["fp32_max_abs_logprob_diff"] == 0.0  # CPU against CPU in the dry run
    for batch in settings["decode_batches"]:
        row = phases["sampler"][f"batch_{batch}"]
        assert row["block1_equals_generate"] == 1.0  # the shifted block-1 student decodes as generate does
        for method in ("hf_generate", "diffusion_block1", "diffusion_block4_dynamic"):
            # stop tokens off: every method writes the same tokens per row, so the speeds compare
            assert row[method]["tokens"] == batch * settings["decode_tokens"]
            assert row[method]["tokens_per_second"] > 0
    # every verdict the dry run can give is given (peak vs prediction needs CUDA)
    assert {name for name, value in checks.items() if value is None} <= {"train_peak_within_prediction"}
    assert all(value is not False for value in checks.values())


def test_gpu_check_bundle_fits_its_budget(tmp_path):
    """``gpu_check.sh size`` measures a bundle: under the limit it passes, over it it fails naming the size."""
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "wheels" / "small.whl").write_bytes(b"0" * 1024)
    script = str(ROOT / "scripts" / "gpu_check.sh")
    fits = subprocess.run(["bash", script, "size", str(bundle)], capture_output=True, text=True, timeout=30)
    assert fits.returncode == 0 and "MiB" in fits.stdout
    (bundle / "wheels" / "big.whl").write_bytes(b"0" * (65 * 2**20))
    over = subprocess.run(["bash", script, "size", str(bundle)], capture_output=True, text=True, timeout=30)
    assert over.returncode != 0 and "64 MiB" in over.stderr


def test_bundle_lists_what_the_check_imports_besides_torch():
    """The pinned distributions ``gpu_check.sh pack`` downloads: this checkout's tested versions of the stack, never
    torch or what a torch installation brings, nor the large binaries the GPU machine must have."""
    import importlib.metadata as metadata

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check_bundle import required_distributions
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    listed = {name: (version, pure) for name, version, pure in required_distributions()}
    for name in ("transformers", "trl", "accelerate", "peft", "datasets", "huggingface-hub", "tokenizers"):
        assert listed[name][0] == metadata.version(name)
    assert listed["trl"][1] and not listed["tokenizers"][1]  # pure-Python / a binary wheel per Python version
    assert not {"torch", "numpy", "pyarrow", "pandas", "sympy", "jinja2", "filelock"} & set(listed)
