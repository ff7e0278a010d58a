"""Multi-process training on CPU (DDP, DeepSpeed ZeRO-2/3) and the example configs for ``opdlm-convert``.

DDP, ZeRO-2 and ZeRO-3 must give the single-process step, number for number.

``tests/integration/distributed_worker.py`` trains one OPD step on a tiny model, once per loss normalisation, with a fixed
global batch of 4 prompts: here as one process with batch 4 (the reference), and under ``accelerate launch`` as two
gloo processes with batch 2 each, launched with the shipped accelerate configs (``examples/configs/accelerate``,
overridden to 2 processes and no mixed precision). The worker's rollouts are greedy and stop at uneven lengths, so
the step is deterministic and the two normalisations differ; its optimizer makes the update proportional to the
gradient (see the worker's docstring). Each launch takes ~30-40 s on 2 cores (tests marked ``slow``).

Every YAML under ``examples/configs`` must parse into the example's dataclasses (no GPU needed: ``bf16`` is
overridden on the command line) and the accelerate configs must load with accelerate's own reader.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "distributed_worker.py"
ACCELERATE_CONFIGS = ROOT / "examples" / "configs" / "accelerate"
LAUNCHERS = {"ddp": "multi_gpu.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
ZERO_OPTIMIZER = {"zero2": (2, "DeepSpeedZeroOptimizer"), "zero3": (3, "DeepSpeedZeroOptimizer_Stage3")}
NORMALIZATIONS = ("sequence", "token")
GLOBAL_BATCH = 4
LAUNCH_TIMEOUT_S = 300
EXAMPLE_CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
LOSS_RTOL = 1e-5  # measured: identical or 1 ulp (float32 sums in a different order)
PARAM_ATOL = 1e-6  # measured max |difference| ~4e-9, against updates up to ~1.4e-3


@dataclass
class Run:
    """What a worker launch measured: ``results[normalization]`` and ``params[normalization][name] = (before, after)``."""

    results: dict
    params: dict


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(prefix: list[str], per_device_batch: int, out: Path, *extra: str) -> Run:
    """Run the worker (under ``prefix``) and load what rank 0 wrote; fail with the log tail if it did not finish."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # two processes on two cores
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [*prefix, str(WORKER), "--out", str(out), "--per-device-batch", str(per_device_batch), *extra]
    proc = subprocess.run(
        command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    if proc.returncode != 0 or not out.exists():
        log = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{' '.join(command)} exited with {proc.returncode}:\n{log}")
    norms = [norm for norm in NORMALIZATIONS if Path(f"{out}.{norm}.pt").exists()]
    params = {norm: torch.load(f"{out}.{norm}.pt") for norm in norms}
    return Run(json.loads(out.read_text()), params)


def _accelerate_prefix(launcher: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIGS / LAUNCHERS[launcher]),
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("single") / "result.json"
    return _launch([sys.executable], GLOBAL_BATCH, out)


@pytest.fixture(scope="module", params=list(LAUNCHERS))
def distributed(request, tmp_path_factory) -> tuple[str, Run]:
    out = tmp_path_factory.mktemp(request.param) / "result.json"
    return request.param, _launch(_accelerate_prefix(request.param), GLOBAL_BATCH // 2, out)


def _max_update(params: dict) -> float:
    return max((after - before).abs().max().item() for before, after in params.values())


def _max_difference(params: dict, other: dict) -> float:
    assert params.keys() == other.keys()
    return max((params[name][1] - other[name][1]).abs().max().item() for name in params)


@pytest.mark.slow
def test_reference_step_can_reveal_normalisation_errors(reference):
    """Uneven rows make the two normalisations differ, and the update is far above the comparison tolerance."""
    sequence, token = reference.results["sequence"], reference.results["token"]
    lengths = sorted(len(ids) for ids in sequence["supervised_tokens"].values())
    assert len(sequence["supervised_tokens"]) == GLOBAL_BATCH
    assert len(set(lengths)) > 1, f"all rows supervise the same number of tokens ({lengths})"
    assert abs(sequence["logged_loss"] - token["logged_loss"]) > 100 * LOSS_RTOL * token["logged_loss"]
    for norm in NORMALIZATIONS:
        assert _max_update(reference.params[norm]) > 100 * PARAM_ATOL


@pytest.mark.slow
def test_two_gloo_processes(distributed):
    launcher, run = distributed
    for norm in NORMALIZATIONS:
        result = run.results[norm]
        assert result["world_size"] == 2
        assert result["backend"] == "gloo"
        assert result["distributed_type"] == f"DistributedType.{EXPECTED_TYPE[launcher]}"
        if launcher in ZERO_OPTIMIZER:
            assert (result["zero_stage"], result["optimizer"]) == ZERO_OPTIMIZER[launcher]
        # The ranks trained different rows (uneven lengths): their local losses differ.
        first, second = result["rank_losses"]
        assert first != pytest.approx(second, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_step_matches_single_process(reference, distributed, normalization):
    """Same rollouts, logged loss, gradient norm and metrics; same parameters after the optimizer step."""
    _, run = distributed
    single, multi = reference.results[normalization], run.results[normalization]
    assert multi["supervised_tokens"] == single["supervised_tokens"]
    assert multi["logged_loss"] == pytest.approx(single["logged_loss"], rel=LOSS_RTOL)
    # The logged loss is the mean of the ranks' losses: each rank divides by the global count / num_processes.
    assert sum(multi["rank_losses"]) / 2 == pytest.approx(single["logged_loss"], rel=LOSS_RTOL)
    assert multi["grad_norm"] == pytest.approx(single["grad_norm"], rel=LOSS_RTOL)
    # Logged metrics are over all processes' rows (ZeRO-3: the teacher's parameter count behind `flops` too).
    assert multi["divergence"] == pytest.approx(single["divergence"], rel=LOSS_RTOL)
    assert multi["stopped_ratio"] == single["stopped_ratio"]
    assert multi["supervised_per_row"] == single["supervised_per_row"]
    assert multi["flops"] == pytest.approx(single["flops"], rel=1e-6)
    assert _max_difference(run.params[normalization], reference.params[normalization]) <= PARAM_ATOL


# ----------------------------------------------------------------------------------------------- same collectives
# Issue 19: rollouts of very different lengths on the two ranks (rank 0's rows stop at their first token, rank 1's run
# to the limit), a teacher head applied in chunks smaller than a rollout, and ZeRO-3 parameters left sharded during
# generation. Before the fix the ranks issued different numbers of collectives: gloo aborted with "Received data size
# doesn't match expected size" (SIGABRT; on NCCL a hang).
SHARP = ("--sharp", "--teacher-chunk-size", "4", "--sharded-generation", "--normalizations", "sequence")


@pytest.mark.slow
def test_zero3_with_uneven_rollouts_and_chunked_teacher_matches_single_process(tmp_path):
    single = _launch([sys.executable], GLOBAL_BATCH, tmp_path / "single.json", *SHARP)
    multi = _launch(_accelerate_prefix("zero3"), GLOBAL_BATCH // 2, tmp_path / "zero3.json", *SHARP)
    one, two = single.results["sequence"], multi.results["sequence"]
    lengths = [len(ids) for ids in one["supervised_tokens"].values()]
    assert lengths[:2] == [1, 1] and min(lengths[2:]) > 4 * max(lengths[:2]), lengths  # the case is sharp
    assert (two["world_size"], two["zero_stage"]) == (2, 3)
    assert two["supervised_tokens"] == one["supervised_tokens"]
    assert two["logged_loss"] == pytest.approx(one["logged_loss"], rel=LOSS_RTOL)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=LOSS_RTOL)
    assert _max_difference(multi.params["sequence"], single.params["sequence"]) <= PARAM_ATOL


SYNC_WORKER = ROOT / "tests" / "integration" / "synced_sampler_worker.py"


def _sampler_run(out: Path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    prefix = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run"]
    if processes > 1:
        prefix += ["--nproc_per_node", str(processes), "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*prefix, str(SYNC_WORKER), "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False)


@pytest.mark.slow
def test_sampler_ranks_stay_in_step_when_forwards_are_collectives(tmp_path):
    """synced_ranks: a rank whose rows stopped keeps answering the other rank's per-forward collective."""
    single = _sampler_run(tmp_path / "single.json", "--single", processes=1)
    synced = _sampler_run(tmp_path / "synced.json")
    assert single.returncode == 0 and synced.returncode == 0, (single.stderr + synced.stderr)[-3000:]
    expected = json.loads((tmp_path / "single.json").read_text())
    assert json.loads((tmp_path / "synced.json").read_text()) == expected and expected["lengths"] == [16, 16]
    # without it (the previous behaviour) the busy rank waits for a collective nobody answers
    unsynced = _sampler_run(tmp_path / "unsynced.json", "--unsynced")
    assert unsynced.returncode != 0 and not (tmp_path / "unsynced.json").exists()
    assert "Timed out" in unsynced.stderr or "closed by peer" in unsynced.stderr, unsynced.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- example configs
@pytest.fixture(scope="module")
def convert_dataclasses() -> tuple:
    from trl import ModelConfig

    from opdlm_trl import OPDConfig
    from opdlm_trl.cli.convert import ConvertArguments

    return ConvertArguments, OPDConfig, ModelConfig


def test_example_configs_exist():
    names = {path.name for path in EXAMPLE_CONFIGS}
    expected = {
        "qwen3_0.6b_full.yaml",
        "qwen3_4b_lora_1gpu.yaml",
        "qwen3_8b_zero3_8gpu.yaml",
        "vllm_server_teacher.yaml",
    }
    assert expected <= names
    assert {path.name for path in ACCELERATE_CONFIGS.glob("*.yaml")} >= {*LAUNCHERS.values(), "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda path: path.name)
def test_example_config_keys_are_known_fields(path, convert_dataclasses):
    """A misspelt key would otherwise be noticed only when a GPU run ignores or rejects it."""
    import dataclasses

    known = {field.name for cls in convert_dataclasses for field in dataclasses.fields(cls)}
    unknown = set(yaml.safe_load(path.read_text())) - known
    assert not unknown, f"{path.name}: not a field of ConvertArguments, OPDConfig or ModelConfig: {sorted(unknown)}"


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda path: path.name)
def test_example_config_parses_like_opdlm_convert(path, convert_dataclasses, tmp_path):
    """TrlParser builds the three dataclasses (OPDConfig validates its choices); values survive unchanged."""
    from trl import TrlParser

    raw = yaml.safe_load(path.read_text())
    overrides = ["--bf16", "false", "--use_cpu", "true", "--output_dir", str(tmp_path)]  # this machine has no GPU
    script_args, training_args, model_args = TrlParser(convert_dataclasses).parse_args_and_config(
        args=["--config", str(path), *overrides]
    )
    parsed = {**vars(script_args), **vars(model_args), **vars(training_args)}
    for key in ("block_size", "shift", "teacher_backend", "teacher_top_k", "learning_rate", "max_completion_length"):
        if key in raw:
            assert parsed[key] == raw[key], key
    if "lr_scheduler_kwargs" in raw:
        assert training_args.lr_scheduler_kwargs == raw["lr_scheduler_kwargs"]
    if raw.get("teacher_backend") == "vllm_server":
        assert training_args.teacher_url and training_args.teacher_top_k


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    stage = (config.deepspeed_config or {}).get("zero_stage")
    assert str(config.distributed_type) in ("DistributedType.MULTI_GPU", "DistributedType.DEEPSPEED")
    assert stage == {"deepspeed_zero2.yaml": 2, "deepspeed_zero3.yaml": 3}.get(path.name)
