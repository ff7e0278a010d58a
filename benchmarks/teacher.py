"""Teacher scoring throughput per backend, and the teacher parameter memory the trainer process holds.

Not a test: it prints a table and writes JSON. Every backend scores the same left-padded prompts and
ragged completions. Throughput counts scored completion tokens per second (median of ``--repeats``
timed calls after one warm-up); ``held_param_MiB`` counts teacher parameters stored in the trainer
process that the student does not already hold (shared-weights: ~0; local: a full copy; server: 0,
the weights live in the server process).

    python benchmarks/teacher.py --model smollm2 --batch 8 --prompt-len 64 --completion-len 128
    python benchmarks/teacher.py --model-dir DIR --url http://127.0.0.1:8000   # + a vLLM server serving DIR
    python benchmarks/teacher.py --smoke          # tiny model, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from opdlm_trl.masks import left_pad_to_block
from opdlm_trl.modeling import to_diffusion
from opdlm_trl.teachers import LocalTeacher, SharedWeightsTeacher, VLLMServerTeacher
from opdlm_trl.tiny import smollm2_shaped_model, tiny_model, tiny_tokenizer


@dataclass
class Result:
    backend: str
    top_k: int | None
    batch: int
    scored_tokens: int
    seconds: float
    tokens_per_s: float
    held_param_MiB: float


def load_model(args) -> torch.nn.Module:
    if args.model_dir:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if args.model == "smollm2":
        return smollm2_shaped_model()
    return tiny_model("llama", hidden_size=128, num_heads=2)  # the shape the vLLM test server serves


def make_batch(vocab: int, batch: int, prompt_len: int, completion_len: int, seed: int = 0):
    """Prompts of varied length (left-padded to a block boundary) and completions 50-100% of the width."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch,), generator=generator).tolist()
    prompts = [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in lengths]
    prompt_ids, prompt_mask = left_pad_to_block(prompts, 4, pad_token_id=0)
    completion_ids = torch.randint(10, vocab, (batch, completion_len), generator=generator)
    ends = torch.randint(max(1, completion_len // 2), completion_len + 1, (batch,), generator=generator)
    completion_mask = (torch.arange(completion_len)[None] < ends[:, None]).long()
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def held_bytes(teacher_params, student: torch.nn.Module) -> int:
    """Bytes of teacher parameters whose storage the student does not already own."""
    student_storage = {p.untyped_storage().data_ptr() for p in student.parameters()}
    return sum(
        p.numel() * p.element_size() for p in teacher_params if p.untyped_storage().data_ptr() not in student_storage
    )


def time_backend(name, teacher, batch, top_k, repeats, held) -> Result:
    teacher.score(*batch, top_k=top_k)  # warm-up (allocations, connection pool, server compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        teacher.score(*batch, top_k=top_k)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    scored = int(batch[3].sum())
    return Result(name, top_k, batch[0].shape[0], scored, seconds, scored / seconds, held / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--model-dir", help="load this checkpoint instead (the one a --url server serves)")
    parser.add_argument("--url", help="also benchmark a vLLM server serving the same weights")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, small batch (CI)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch, args.prompt_len, args.completion_len, args.repeats = "tiny", 4, 16, 32, 2

    original = load_model(args)
    vocab = original.get_output_embeddings().weight.shape[0]
    batch = make_batch(vocab, args.batch, args.prompt_len, args.completion_len)

    from peft import LoraConfig, get_peft_model

    student, _ = to_diffusion(copy.deepcopy(original), tiny_tokenizer(), block_size=4, probe=False)
    student = get_peft_model(student, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    local = LocalTeacher(copy.deepcopy(original), chunk_size=args.chunk_size)
    shared = SharedWeightsTeacher(student, chunk_size=args.chunk_size)
    backends = [
        ("local", local, held_bytes(local.model.parameters(), student)),
        ("shared", shared, held_bytes([p for p in student.parameters() if not p.requires_grad], student)),
    ]
    results = []
    for name, teacher, held in backends:
        for top_k in (args.top_k, None):
            results.append(time_backend(name, teacher, batch, top_k, args.repeats, held))
    if args.url:
        server = VLLMServerTeacher(args.url, vocab_size=vocab)
        results.append(time_backend("vllm_server", server, batch, args.top_k, args.repeats, 0))

    print(f"{'backend':<12} {'top_k':>6} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>10} {'held MiB':>9}")
    for r in results:
        top = "full" if r.top_k is None else str(r.top_k)
        print(
            f"{r.backend:<12} {top:>6} {r.batch:>5} {r.scored_tokens:>7} {r.seconds:>8.3f} "
            f"{r.tokens_per_s:>10.1f} {r.held_param_MiB:>9.1f}"
        )
    if args.output:
        payload = {
            "config": vars(args),
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
            "teacher_params": sum(p.numel() for p in original.parameters()),
            "results": [asdict(r) for r in results],
        }
        with open(args.output, "w") as handle:
            json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    main()
