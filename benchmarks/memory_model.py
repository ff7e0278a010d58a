"""Predicted peak GPU memory of the shipped training configs, calibrated by ``benchmarks/memory.py``'s measurements.

The prediction adds what a process holds for the whole run (weights, gradients, optimizer state, a local teacher)
to the larger of its two transient peaks:

* rollout: the sampler's KV cache for the process's generation batch at ``max_prompt_length +
  max_completion_length`` tokens (bf16 under autocast), plus one gathered bf16 copy of the student under ZeRO-3 with
  ``ds3_gather_for_generation``;
* training micro-batch: the teacher targets held for the whole generation batch (hidden states or top-k), and the
  activations of one ``[prompt | x0 | x_t]`` forward + backward with gradient checkpointing and the chunked loss,
  from a linear fit (:class:`Fit`) to the float32 CPU measurements at Qwen3-0.6B's widths (2 and 4 layers). Kept in float32 (the residual stream and the checkpointed layer inputs stay
  float32 under bf16 autocast with float32 weights), so it is an upper bound for the bf16 parts.

Not measured on a GPU (this project has had none): allocator fragmentation, CUDA context (~0.5 GB) and the 4D
attention mask (bf16, ``tokens^2`` per row) are added as stated constants. ``benchmarks/gpu_check.py`` compares the
prediction with ``torch.cuda.max_memory_allocated`` where a GPU exists.

    python benchmarks/memory_model.py --measurements benchmarks/out/memory/summary.json   # markdown table
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from opdlm_trl.tiny import parameter_count, qwen3_config

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
CUDA_CONTEXT_GIB = 0.5
MEASURED_VOCAB = 151_936  # the vocabulary of the measurements the fit scales from (Qwen3-0.6B widths)


@dataclass(frozen=True)
class Shape:
    """What a Qwen3 model's memory depends on, from its published config (``opdlm_trl.tiny.QWEN3_ARCHITECTURES``)."""

    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, name: str) -> Shape:
        config = qwen3_config(name)
        return cls(
            parameter_count(config), config.num_hidden_layers, config.hidden_size, config.num_key_value_heads,
            config.head_dim, config.vocab_size,
        )  # fmt: skip


# How each shipped config is launched (docs/multi-gpu.md): GPUs per run and ZeRO stage of the accelerate config.
LAUNCH = {
    "qwen3_0.6b_full.yaml": (1, 0),
    "qwen3_4b_lora_1gpu.yaml": (1, 0),
    "qwen3_8b_zero3_8gpu.yaml": (8, 3),
    "vllm_server_teacher.yaml": (1, 0),
}
GPU_GIB = 80
# Masked share of a rollout's positions in the state the trainer picks per block (per_block selection, block 4,
# about one commit per step early in training: 4, 3, 2, 1 masked -> 62.5%).
SUPERVISED_SHARE = 0.625


@dataclass
class Fit:
    """Activation bytes of one training micro-batch (float32 CPU measurements at Qwen3-0.6B's widths):

    ``tokens x (per_layer x layers + per_token) x hidden/1024 + per_position x min(N, loss_chunk_size) x V/151,936``

    where ``tokens`` is the micro-batch's ``[prompt | x0 | x_t]`` width and ``N`` its supervised positions: the
    chunked loss holds a few ``(chunk, V)`` float32 tensors at a time, so that term stops growing at the chunk size.
    ``per_layer`` is not fitted: with gradient checkpointing each layer keeps its float32 input (4 bytes x hidden per
    token), a cost the measured depths (2 and 4 layers) cannot resolve next to the loss chunk's gigabytes.
    ``per_token`` (one layer's recomputed activations, embeddings) and ``per_position`` are fitted; both are scaled
    to another model by its hidden width and vocabulary.
    """

    per_layer: float
    per_token: float
    per_position: float
    chunk: int = 1024
    CHECKPOINTED_INPUT = 4 * 1024  # bytes per token per layer at hidden 1,024 (float32 residual stream)

    @classmethod
    def from_measurements(cls, cells: list[dict], chunk: int = 1024) -> Fit:
        import numpy as np

        rows, values = [], []
        for cell in cells:
            if cell.get("code") != "current" or "phases" not in cell:
                continue
            loss, backward = cell["phases"]["loss"], cell["phases"]["backward"]
            after_loss = loss.get("end_above_start_mib", 0) + backward["peak_above_start_mib"]
            peak = max(loss["peak_above_start_mib"], after_loss)
            tokens = 2 * (128 + 2 * cell["length"])  # micro-batch 2 x [prompt | x0 | x_t]
            shape = cell["shape"]
            positions = (
                min(cell.get("supervised_positions", cell["length"]), chunk)
                * shape.get("vocab", MEASURED_VOCAB)
                / MEASURED_VOCAB
            )
            width = shape["hidden_size"] / 1024
            rows.append([tokens * width, positions])
            values.append(peak * 2**20 - tokens * cls.CHECKPOINTED_INPUT * cell["layers"] * width)
        if len(rows) < 3:
            raise ValueError("need >= 3 measured cells (two depths) to fit the activation model")
        per_token, per_position = np.linalg.lstsq(np.array(rows), np.array(values), rcond=None)[0]
        return cls(cls.CHECKPOINTED_INPUT, max(float(per_token), 0.0), max(float(per_position), 0.0), chunk=chunk)

    def bytes(self, tokens: int, layers: int, hidden: int, supervised: int | None = None, vocab: int = MEASURED_VOCAB):
        positions = min(self.chunk if supervised is None else supervised, self.chunk) * vocab / MEASURED_VOCAB
        return tokens * (self.per_layer * layers + self.per_token) * hidden / 1024 + self.per_position * positions


def predict(config: dict, shape: Shape, gpus: int, zero: int, fit: Fit) -> dict[str, float]:
    """Per-GPU GiB by component and the predicted peak."""
    lora = bool(config.get("use_peft"))
    weight_bytes = 2 if str(config.get("dtype", "float32")) in ("bfloat16", "bf16") else 4
    deepspeed_bf16 = zero > 0  # DeepSpeed bf16 keeps bf16 weights + float32 master weights in its optimizer
    shard = gpus if zero == 3 else 1
    if lora:
        rank = int(config.get("lora_r", 16))
        modules = len(config.get("lora_target_modules") or [0] * 7)
        trainable = shape.layers * modules * rank * 2 * shape.hidden * 1.5  # (in + out) ~ 1.5 hidden on average
    else:
        trainable = shape.params
    held = {}
    held["student weights"] = shape.params * (2 if deepspeed_bf16 else weight_bytes) / shard
    optimizer_shard = gpus if zero >= 1 else 1
    per_param = (4 + 8) if deepspeed_bf16 else (weight_bytes + 2 * weight_bytes)  # (master +) Adam m, v (+ grads)
    held["gradients + optimizer"] = trainable * (per_param + (4 if deepspeed_bf16 else 0)) / optimizer_shard
    teacher = config.get("teacher_backend", "auto")
    # a local teacher is a frozen copy loaded like the student (float32 at 0.6B, bf16 under DeepSpeed)
    teacher_bytes = 2 if deepspeed_bf16 else weight_bytes
    held["teacher"] = shape.params * teacher_bytes / shard if teacher in ("local", "auto") and not lora else 0.0
    static = sum(held.values())

    rows = int(config["per_device_train_batch_size"]) * int(config.get("gradient_accumulation_steps", 1))
    prompt, completion = int(config.get("max_prompt_length", 1024)), int(config["max_completion_length"])
    kv = rows * (prompt + completion) * shape.layers * 2 * shape.kv_heads * shape.head_dim * 2
    gathered = shape.params * 2 if zero == 3 and config.get("ds3_gather_for_generation", True) else 0.0
    top_k = config.get("teacher_top_k")
    per_token_target = 4 * shape.hidden + 4 if top_k is None else top_k * 12 + 4
    targets = rows * completion * per_token_target
    micro = int(config["per_device_train_batch_size"])
    tokens = micro * (prompt + 2 * completion)
    mask = micro * (prompt + 2 * completion) ** 2 * 2  # the bf16 additive 4D mask
    supervised = int(micro * completion * SUPERVISED_SHARE)
    activations = fit.bytes(tokens, shape.layers, shape.hidden, supervised, shape.vocab) + mask
    transient = {"rollout (KV cache + gathered copy)": kv + gathered, "training (targets + activations)": 0.0}
    transient["training (targets + activations)"] = targets + activations
    peak = static + max(transient.values()) + CUDA_CONTEXT_GIB * GIB
    out = {name: value / GIB for name, value in {**held, **transient}.items()}
    out.update(targets=targets / GIB, peak=peak / GIB, gpus=gpus, zero=zero)
    return out


def table(measurements: Path) -> str:
    cells = json.loads(measurements.read_text())
    fit = Fit.from_measurements(cells)
    lines = [
        "| config | GPUs | weights | grads + optimizer | teacher | rollout peak | targets held | training peak | "
        "predicted peak / GPU | fits 80 GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (gpus, zero) in LAUNCH.items():
        config = yaml.safe_load((ROOT / "examples" / "configs" / name).read_text())
        p = predict(config, Shape.of(config["model_name_or_path"]), gpus, zero, fit)
        fits = "yes" if p["peak"] <= 0.9 * GPU_GIB else "NO"
        lines.append(
            f"| `{name}` | {gpus}{' ZeRO-3' if zero == 3 else ''} | {p['student weights']:.1f} | "
            f"{p['gradients + optimizer']:.1f} | {p['teacher']:.1f} | {p['rollout (KV cache + gathered copy)']:.1f} | "
            f"{p['targets']:.2f} | {p['training (targets + activations)']:.1f} | **{p['peak']:.1f} GiB** | {fits} |"
        )
    note = (
        f"\nActivation fit (float32, per micro-batch token): {fit.per_layer:.0f} B x layers x hidden/1024 + "
        f"{fit.per_token:.0f} B; loss chunk {fit.per_position / 2**20:.2f} MiB per supervised position up to "
        f"{fit.chunk}; CUDA context {CUDA_CONTEXT_GIB} GiB."
    )
    return "\n".join(lines) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measurements", type=Path, default=ROOT / "benchmarks" / "out" / "memory" / "summary.json")
    print(table(parser.parse_args().measurements))


if __name__ == "__main__":
    main()
