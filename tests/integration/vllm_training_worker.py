"""A few OPD steps whose teacher is a real vLLM server; run by ``tests/integration/test_vllm_training.py`` as one process and,
under ``accelerate launch``, as two gloo processes sharing the one server.

Every process converts the model the server serves (``--model-dir``, i.e. ``OPDLM_VLLM_MODEL_DIR``) and trains
``--steps`` optimizer steps with ``teacher_backend="vllm_server"`` and top-k targets. Each process records every
``teacher.score`` call it made (the exact rows and the targets the server returned) and afterwards scores the same
rows with a float32 ``LocalTeacher`` on the same weights, so the comparison is per rank and on that rank's own rows.
Rank 0 reads the server's Prometheus counters (``/metrics``) before and after training, between barriers, so the
difference is what the training processes sent: the test compares it with the sum of the ranks' recorded rows.
Rank 0 writes one JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import requests
import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdlm_trl import OPDTrainer
from opdlm_trl.teachers import LocalTeacher
from tests.helpers import cpu_config

PROMPTS = [[{"role": "user", "content": f"Write function number {i} in Python."}] for i in range(8)]
TOP_K = 4
COUNTERS = {"prompt_tokens": "vllm:prompt_tokens_total", "requests": "vllm:request_success_total"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="Base URL of the vLLM server (OPDLM_VLLM_URL).")
    parser.add_argument("--model-dir", required=True, help="The directory the server serves (OPDLM_VLLM_MODEL_DIR).")
    parser.add_argument("--out", required=True, help="JSON written by rank 0.")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    return parser.parse_args()


def server_counters(url: str) -> dict[str, float]:
    """Totals of the server's prompt-token and finished-request counters (summed over their labels).

    vLLM counts every sequence of a batched ``/v1/completions`` request as one request.
    """
    text = requests.get(f"{url.rstrip('/')}/metrics", timeout=30).text
    totals = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for key, metric in COUNTERS.items():
            if line.startswith(metric + "{") or line.startswith(metric + " "):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


class TeacherSpy:
    """Wraps ``teacher.score`` and keeps each call's inputs and returned targets (CPU copies)."""

    def __init__(self, teacher):
        self.calls: list[dict] = []
        self._score = teacher.score
        teacher.score = self.score

    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=None):
        targets = self._score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k)
        inputs = [t.detach().cpu().clone() for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)]
        self.calls.append({"inputs": inputs, "top_k": top_k, "targets": targets.to("cpu")})
        return targets

    def prompts(self) -> list[list[int]]:
        """The distinct real prompts (token ids) this process had scored, sorted."""
        rows = {
            tuple(ids[mask.bool()].tolist())
            for call in self.calls
            for ids, mask in zip(call["inputs"][0], call["inputs"][1], strict=True)
        }
        return [list(row) for row in sorted(rows)]

    def sent(self) -> dict[str, int]:
        """Sequences and tokens sent to the server: rows with a completion, real (unpadded) tokens only."""
        sequences = tokens = 0
        for call in self.calls:
            _, prompt_mask, _, completion_mask = call["inputs"]
            scored = completion_mask.sum(1) > 0
            sequences += int(scored.sum())
            tokens += int(prompt_mask.sum(1)[scored].sum() + completion_mask.sum(1)[scored].sum())
        return {"sequences": sequences, "tokens": tokens}


def near_tie_free(top_logprobs: torch.Tensor, mask: torch.Tensor, gap: float = 1e-4) -> torch.Tensor:
    """Top-k slots whose log-prob is separated from both neighbours by more than ``gap`` (float noise cannot
    swap them), restricted to real positions."""
    gaps = (top_logprobs[..., :-1] - top_logprobs[..., 1:]).abs() > gap
    ones = torch.ones_like(gaps[..., :1])
    separated = torch.cat([gaps, ones], -1) & torch.cat([ones, gaps], -1)
    return separated & mask[..., None]


@torch.no_grad()
def compare_with_local(model_dir: str, calls: list[dict]) -> dict:
    """Score each recorded call's rows with a float32 LocalTeacher on the served weights; the largest errors."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    local = LocalTeacher(model)
    worst = {"top_logprobs": 0.0, "token_logprobs": 0.0, "ids_mismatch": 0, "ids_compared": 0, "positions": 0}
    for call in calls:
        got = call["targets"]
        expected = local.score(*call["inputs"], top_k=got.top_ids.shape[-1])
        mask = expected.mask
        assert torch.equal(got.mask, mask), "the server's targets cover other positions than the rows sent"
        worst["positions"] += int(mask.sum())
        worst["top_logprobs"] = max(
            worst["top_logprobs"], (got.top_logprobs - expected.top_logprobs)[mask].abs().max().item()
        )
        worst["token_logprobs"] = max(
            worst["token_logprobs"], (got.token_logprobs - expected.token_logprobs)[mask].abs().max().item()
        )
        separated = near_tie_free(expected.top_logprobs, mask)
        worst["ids_compared"] += int(separated.sum())
        worst["ids_mismatch"] += int((got.top_ids != expected.top_ids)[separated].sum())
    return worst


def build_trainer(args: argparse.Namespace, output_dir: str) -> OPDTrainer:
    """Full fine-tune of the served model, converted on entry; 8-token sampled rollouts, top-k vLLM targets."""
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = cpu_config(
        output_dir,
        per_device_train_batch_size=args.per_device_batch,
        max_steps=args.steps,
        gradient_checkpointing=True,
        teacher_backend="vllm_server",
        teacher_url=args.url,
        teacher_top_k=TOP_K,
    )
    dataset = Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS])
    return OPDTrainer(
        model, args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(args.model_dir)
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args, output_dir)
        accelerator = trainer.accelerator
        spy = TeacherSpy(trainer.teacher)
        student = accelerator.unwrap_model(trainer.model)
        before = {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}
        accelerator.wait_for_everyone()  # every rank's construction-time probes are done
        counters_before = server_counters(args.url) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        trainer.train()
        accelerator.wait_for_everyone()  # every rank's scoring requests are done
        counters_after = server_counters(args.url) if accelerator.is_main_process else None
        update = max((p.detach() - before[n]).abs().max().item() for n, p in student.named_parameters() if n in before)
        rank = {
            "rank": accelerator.process_index,
            "teacher": type(trainer.teacher).__name__,
            "calls": len(spy.calls),
            "sent": spy.sent(),
            "prompts_scored": spy.prompts(),
            "comparison": compare_with_local(args.model_dir, spy.calls),
            "max_update": update,
            "finite_parameters": all(torch.isfinite(p).all().item() for p in student.parameters()),
        }
        ranks = gather_object([rank])
        if accelerator.is_main_process:
            result = {
                "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type),
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                "global_step": trainer.state.global_step,
                "server": {key: counters_after[key] - counters_before[key] for key in COUNTERS},
                "ranks": ranks,
            }
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
