"""Every ``examples/configs/*.yaml`` goes through ``opdlm-convert``'s own parse -> build -> train path.

What a test changes in a config, and why (everything else runs as written, so a wrong field fails here):

* ``model_name_or_path`` (and ``teacher_model_name_or_path`` where set): the tiny random Qwen3 of conftest.py
  with Qwen3's real tokenizer and 151,936 embedding rows, so the mask-token policy and
  ``chat_template_kwargs`` act as on the real checkpoints; hub models are out of reach and the embedded
  SmolLM2 takes minutes to build.
* ``dataset_name``: a small local prompt file (the configs point at your data or at HumanEval).
* ``output_dir``: a temporary folder.
* ``max_steps``: 2 optimizer steps, the smallest run that crosses a step boundary (curriculum, scheduler).
* ``min_completion_length`` / ``max_completion_length``: 8 -> 16 rollout tokens (8 -> 8 in the multi-process and
  vLLM runs) instead of the recipes' 100 -> 4,000, a compute budget rather than a setting (100-token rollouts made
  the two Qwen3 runs take minutes on CPU); the curriculum fields themselves still run as written.
* GPU-only settings, on a machine without CUDA: ``use_cpu`` true, and where a config asks for them ``bf16``
  false (bf16 autocast on a CPU is fast only with bf16 instructions, see opdlm_trl/precision.py) and ``dtype``
  float32 (bfloat16 matmuls are slow or missing on CPUs). ``test_config_trains_float32_master_weights`` keeps both
  as written: it only builds the trainer.

Every config also runs the way its header says it runs:

* the one-process configs (including the ZeRO-3 one, as a plain run) in this process;
* the ZeRO-3 recipe under ``accelerate launch`` with its own DeepSpeed file
  (``examples/configs/accelerate/deepspeed_zero3.yaml``) as 2 CPU processes (gloo) for 2 optimizer steps, with
  ``--num_processes 2 --mixed_precision no`` on the launcher and ``--save_steps 2`` (so that the DeepSpeed
  checkpoint is written and checked) as the only further changes; ``tests/integration/convert_launcher.py`` runs
  ``opdlm-convert`` without building DeepSpeed's optional shared-memory kernel (minutes of JIT compile);
* the vLLM-server recipe against the real vLLM CPU server scripts/test.sh starts, with the model replaced by the
  directory the server serves (``OPDLM_VLLM_MODEL_DIR``, a tiny Llama: the student must be converted from the
  served weights) and ``teacher_url`` by ``OPDLM_VLLM_URL``. Without the server it skips (fails under CI=true).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from opdlm_trl import OPDConfig, diffusion_settings, load_diffusion_model
from opdlm_trl.cli import convert
from opdlm_trl.eval.report import TEACHER_SYSTEM, student_system, sweep_system

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(path.stem for path in (ROOT / "examples" / "configs").glob("*.yaml"))
NOT_TRAINED = {"vllm_server_teacher": "needs a vLLM server: test_vllm_server_config_trains_two_steps"}
IN_CI = os.environ.get("CI", "").lower() == "true"
LAUNCH_TIMEOUT_S = 400
QWEN3_TOKENS, QWEN3_ROWS = 151_669, 151_936
# 16 prompts: two optimizer steps of the largest recipe batch (8 prompts a step), so no config runs out of data.
PROMPTS = [f"Write a Python function that multiplies a number by {n}." for n in range(16)]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    return str(path)


def _config(name: str) -> tuple[str, dict]:
    path = ROOT / "examples" / "configs" / f"{name}.yaml"
    return str(path), yaml.safe_load(path.read_text())


def _cpu_overrides(config: dict) -> list[str]:
    """The GPU-only settings a CPU machine must change (see the module docstring); none on a CUDA machine."""
    if torch.cuda.is_available():
        return []
    overrides = ["--use_cpu", "true"]
    if config.get("bf16"):
        overrides += ["--bf16", "false"]
    if config.get("dtype") == "bfloat16":
        overrides += ["--dtype", "float32"]
    return overrides


def _substitutions(
    config: dict, model_dir: str, prompt_file: str, output_dir: Path, lengths: tuple[int, int] = (8, 16)
) -> list[str]:
    """Model, data, output folder, step count and rollout lengths: the only recipe fields a test replaces."""
    arguments = ["--model_name_or_path", model_dir, "--dataset_name", prompt_file]
    arguments += ["--output_dir", str(output_dir), "--max_steps", "2"]
    arguments += ["--min_completion_length", str(lengths[0]), "--max_completion_length", str(lengths[1])]
    if config.get("teacher_model_name_or_path"):
        arguments += ["--teacher_model_name_or_path", model_dir]
    return arguments


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_into_a_valid_opd_config(name):
    """As written (plus use_cpu where there is no GPU): every field is known and passes OPDConfig's checks."""
    path, config = _config(name)
    cpu = ["--use_cpu", "true"] if not torch.cuda.is_available() else []
    script_args, training_args, model_args = convert.parse_args(["--config", path, *cpu])
    assert isinstance(training_args, OPDConfig)
    assert script_args.dataset_name and model_args.model_name_or_path
    if "qwen3" in str(config.get("model_name_or_path", "")).lower():
        assert training_args.chat_template_kwargs == {"enable_thinking": False}, "Qwen3 converts in non-thinking mode"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("lerning_rate", 1e-5, "Unknown arguments"), ("loss_type", "kl", "loss_type")],
)
def test_a_wrong_config_field_fails(tmp_path, field, value, message):
    _, config = _config("cpu_demo")
    config[field] = value
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message):
        convert.parse_args(["--config", str(path)])


@pytest.mark.slow  # a whole recipe run with before/after reports: 17-22 CPU-seconds each
@pytest.mark.parametrize("name", [name for name in CONFIGS if name not in NOT_TRAINED])
def test_config_trains_two_steps(qwen3_dir, prompt_file, tmp_path, name):
    path, config = _config(name)
    output_dir = tmp_path / "out"
    argv = ["--config", path, *_substitutions(config, qwen3_dir, prompt_file, output_dir), *_cpu_overrides(config)]
    if name in DEEPSPEED_RECIPES:  # run plainly: without DeepSpeed's float32 master copies, load float32
        argv += ["--dtype", "float32"]
    trainer = convert.run(*convert.parse_args(argv))

    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert trainer.chat_template_kwargs == (config.get("chat_template_kwargs") or {})
    report = json.loads((output_dir / "opd_report.json").read_text())
    assert report["training_tokens"] > 0 and report["after"]["samples"]
    # the demo's report (one evaluate_model call): static and dynamic (0.9 and 0.7) decoding of the student in the
    # run's commit order beside the AR teacher's answers
    order = trainer.args.commit_order
    student_rows = {student_system("static", order), sweep_system(0.9, order), sweep_system(0.7, order)}
    teacher_rows = set() if config.get("teacher_backend") == "vllm_server" else {TEACHER_SYSTEM}
    before, after = report["before"]["results"], report["after"]["results"]
    assert set(before) == set(after) == student_rows | teacher_rows
    for row in (*before.values(), *after.values()):
        assert row["tokens_per_forward"] > 0 and row["tokens_per_second"] > 0 and row["teacher_nll_per_token"] > 0
    if config.get("teacher_backend") != "vllm_server":
        assert before[TEACHER_SYSTEM]["tokens_per_forward"] == 1.0  # one forward per AR token
    assert before[student_system("static", order)]["tokens_per_forward"] == 1.0  # static block-4, one token a step
    assert report["after"]["settings"]["commit_orders"] == [order]
    student, tokenizer = load_diffusion_model(str(output_dir))
    settings = diffusion_settings(student)
    assert QWEN3_TOKENS <= settings.mask_token_id < QWEN3_ROWS and settings.teacher_vocab_size == QWEN3_ROWS
    assert settings.block_size == config["block_size"] and settings.shift == config["shift"]
    if config.get("merge_lora_on_save"):
        assert (output_dir / "merged" / "config.json").is_file()


# ----------------------------------------------------------------------------------- master weights
# Recipes whose header launches them under DeepSpeed, with the accelerate file that does it.
DEEPSPEED_RECIPES = {"qwen3_8b_zero3_8gpu": "deepspeed_zero3.yaml"}


@pytest.fixture(scope="module")
def qwen3_bf16_dir(qwen3_dir, tmp_path_factory) -> str:
    """The tiny Qwen3 saved in bfloat16, as hub checkpoints are: a config that loads it without naming a dtype
    must still end up with float32 weights to train."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-qwen3-bf16")
    AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(qwen3_dir).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_float32_master_weights(qwen3_bf16_dir, prompt_file, tmp_path, name):
    """Each recipe's loading path, with its own ``dtype`` and ``bf16`` (only ``use_cpu`` added on CPU), gives the
    optimizer float32 trainable parameters; a DeepSpeed recipe gets them from DeepSpeed's bf16 optimizer, so run
    plainly it is refused, and its launcher file must turn bf16 on."""
    path, config = _config(name)
    argv = ["--config", path, *_substitutions(config, qwen3_bf16_dir, prompt_file, tmp_path / "out")]
    argv += [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    if config.get("teacher_backend") == "vllm_server":
        argv += ["--teacher_backend", "local", "--teacher_top_k", "16"]  # the loading path only: no server needed
    if name in DEEPSPEED_RECIPES:
        assert config["bf16"] is True and config["dtype"] == "bfloat16"
        launcher = yaml.safe_load((ROOT / "examples/configs/accelerate" / DEEPSPEED_RECIPES[name]).read_text())
        assert launcher["distributed_type"] == "DEEPSPEED" and launcher["mixed_precision"] == "bf16"
        with pytest.raises(ValueError, match="allow_bf16_master_weights"):
            convert.build_trainer(*convert.parse_args(argv))
        return
    trainer, _ = convert.build_trainer(*convert.parse_args(argv))
    trainable = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert trainer.args.bf16 == bool(config.get("bf16")) and not trainer.args.allow_bf16_master_weights


# ----------------------------------------------------------------------------------- multi-process and vLLM recipes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logged_losses(log_history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


@pytest.mark.slow
def test_zero3_config_trains_two_steps_on_two_deepspeed_processes(qwen3_dir, prompt_file, tmp_path):
    """The 8-GPU ZeRO-3 recipe with its own accelerate/DeepSpeed file, as 2 gloo processes (~45 s on 2 cores)."""
    from opdlm_trl.checkpoints import last_complete_checkpoint

    path, config = _config("qwen3_8b_zero3_8gpu")
    output_dir = tmp_path / "out"
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "examples" / "configs" / "accelerate" / "deepspeed_zero3.yaml"),
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    arguments = ["--config", path, *_substitutions(config, qwen3_dir, prompt_file, output_dir, lengths=(8, 8))]
    arguments += ["--save_steps", "2", *_cpu_overrides(config)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [*launcher, str(ROOT / "tests" / "integration" / "convert_launcher.py"), *arguments]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"

    report = json.loads((output_dir / "opd_report.json").read_text())
    losses = _logged_losses(report["log_history"])
    assert sorted(losses) == [1, 2] and all(math.isfinite(loss) for loss in losses.values())
    # a ZeRO-3 checkpoint with one parameter/optimizer shard per process, complete for a resume
    checkpoint = output_dir / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / "global_step2").glob("zero_pp_rank_*_model_states.pt"))
    assert shards == [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)]
    assert last_complete_checkpoint(output_dir) == str(checkpoint)
    # zero3_save_16bit_model: the gathered student loads as an ordinary diffusion checkpoint
    student, _ = load_diffusion_model(str(output_dir))
    settings = diffusion_settings(student)
    assert QWEN3_TOKENS <= settings.mask_token_id < QWEN3_ROWS and settings.teacher_vocab_size == QWEN3_ROWS
    assert student.get_input_embeddings().weight.shape[0] == QWEN3_ROWS


@pytest.fixture(scope="module")
def vllm_server() -> tuple[str, str]:
    """``(url, model_dir)`` of the vLLM server scripts/test.sh starts; skip without one (fail under CI=true)."""
    url, model_dir = os.environ.get("OPDLM_VLLM_URL"), os.environ.get("OPDLM_VLLM_MODEL_DIR")
    if not url or not model_dir:
        message = "OPDLM_VLLM_URL / OPDLM_VLLM_MODEL_DIR are not set: no vLLM server for the vLLM-teacher recipe"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: this test must run, see scripts/test.sh)")
        pytest.skip(message)
    return url, model_dir


@pytest.mark.vllm
def test_vllm_server_config_trains_two_steps(vllm_server, prompt_file, tmp_path):
    """The vLLM-teacher recipe against the real server, the student converted from the weights it serves."""
    spec = importlib.util.spec_from_file_location(
        "opdlm_vllm_worker", ROOT / "tests" / "integration" / "vllm_training_worker.py"
    )
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    url, model_dir = vllm_server
    path, config = _config("vllm_server_teacher")
    output_dir = tmp_path / "out"
    argv = ["--config", path, *_substitutions(config, model_dir, prompt_file, output_dir, lengths=(8, 8))]
    argv += ["--teacher_url", url, *_cpu_overrides(config)]
    before = worker.server_counters(url)
    trainer = convert.run(*convert.parse_args(argv))
    sent = worker.server_counters(url)

    assert type(trainer.teacher).__name__ == "VLLMServerTeacher" and trainer.args.teacher_top_k == 16
    assert trainer.state.global_step == 2
    losses = _logged_losses(trainer.state.log_history)
    assert sorted(losses) == [1, 2] and all(math.isfinite(loss) for loss in losses.values())
    # 2 steps x 8 prompts scored (plus the before/after report), every one of them by the server
    assert sent["requests"] - before["requests"] >= 16 and sent["prompt_tokens"] > before["prompt_tokens"]
    report = json.loads((output_dir / "opd_report.json").read_text())
    assert report["training_tokens"] > 0 and report["after"]["samples"]
    assert diffusion_settings(load_diffusion_model(str(output_dir))[0]).block_size == config["block_size"]
