"""Decoding speed: HF ``generate`` (autoregressive, KV cache) vs the block-diffusion sampler.

Not a test: it prints a table and writes JSON. Every configuration decodes exactly the requested
number of tokens (``min_new_tokens`` for ``generate``, no stop ids for the sampler), so tokens/s are
comparable. On a random model the sampler's confidences are near uniform, so ``dynamic`` commits
about one token per step and behaves like ``static``: its speed-up needs a trained student.

    python benchmarks/decode.py --batch-sizes 1 8 --new-tokens 64 128 --output decode.json
    python benchmarks/decode.py --smoke          # tiny model, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from opdlm_trl.modeling import to_diffusion
from opdlm_trl.sampling import DiffusionSampler, SamplerConfig
from opdlm_trl.tiny import smollm2_shaped_model, tiny_model, tiny_tokenizer


@dataclass
class Result:
    method: str
    batch: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    nfe: int
    nfe_per_token: float
    ms_per_forward: float
    tokens_per_step: float
    vs_generate: float | None = None
    cached_vs_uncached: float | None = None


METHODS = {
    "static b4 cached": dict(block_size=4, remasking="static", use_cache=True),
    "static b4 uncached": dict(block_size=4, remasking="static", use_cache=False),
    "dynamic0.9 b4": dict(block_size=4, remasking="dynamic", threshold=0.9, use_cache=True),
    "dynamic0.9 b16": dict(block_size=16, remasking="dynamic", threshold=0.9, use_cache=True),
}


def load_student(args):
    """``(model, description)``: a converted student (a saved one, or a random / tiny one converted here)."""
    if args.model:
        from opdlm_trl import load_diffusion_model

        model, _ = load_diffusion_model(args.model)
        return model.eval(), args.model
    if args.smoke:
        model, name = tiny_model("llama"), "tiny llama (2 layers, hidden 64)"
    else:
        model, name = smollm2_shaped_model(), "random SmolLM2-135M-shaped Llama (30 layers, hidden 576, vocab 49152)"
    vocab = model.get_input_embeddings().weight.shape[0]
    # a random model: any row can serve as [MASK]; an int id avoids growing the embedding
    to_diffusion(model, tiny_tokenizer(), block_size=4, mask_token=vocab - 1, shift=args.shift)
    return model, name


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab - 1, (batch, length), generator=generator)


def time_generate(model, prompts: torch.Tensor, new_tokens: int, pad_id: int) -> Result:
    mask = torch.ones_like(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    seconds = time.perf_counter() - start
    assert out.shape[1] - prompts.shape[1] == new_tokens
    batch = prompts.shape[0]
    return Result(
        "HF generate", batch, new_tokens, seconds, batch * new_tokens / seconds, new_tokens, 1.0,
        1000 * seconds / new_tokens, 1.0,
    )  # fmt: skip


def time_sampler(model, prompts: torch.Tensor, new_tokens: int, pad_id: int, name: str) -> Result:
    sampler = DiffusionSampler(SamplerConfig(max_new_tokens=new_tokens, **METHODS[name]), pad_token_id=pad_id)
    start = time.perf_counter()
    rollout = sampler.sample(model, prompts)
    seconds = time.perf_counter() - start
    assert int(rollout.completion_mask.sum()) == prompts.shape[0] * new_tokens
    batch = prompts.shape[0]
    return Result(
        name, batch, new_tokens, seconds, batch * new_tokens / seconds, rollout.nfe, rollout.nfe / new_tokens,
        1000 * seconds / rollout.nfe, rollout.tokens_per_step,
    )  # fmt: skip


def skip_uncached(method: str, batch: int, new_tokens: int, args: argparse.Namespace) -> bool:
    """The uncached reference is quadratic in length: optionally run it at small sizes only."""
    if "uncached" not in method:
        return False
    too_long = args.uncached_max_tokens is not None and new_tokens > args.uncached_max_tokens
    too_wide = args.uncached_max_batch is not None and batch > args.uncached_max_batch
    return too_long or too_wide


def add_ratios(results: list[Result]) -> None:
    by_key = {(r.method, r.batch, r.new_tokens): r for r in results}
    for r in results:
        base = by_key.get(("HF generate", r.batch, r.new_tokens))
        if base is not None and r.method != "HF generate":
            r.vs_generate = r.tokens_per_s / base.tokens_per_s
        uncached = by_key.get(("static b4 uncached", r.batch, r.new_tokens))
        if r.method == "static b4 cached" and uncached is not None:
            r.cached_vs_uncached = r.tokens_per_s / uncached.tokens_per_s


def table(results: list[Result]) -> str:
    header = "| method | batch | new tokens | s | tokens/s | NFE/token | ms/forward | tokens/step | vs generate | cached/uncached |"
    lines = [header, "|" + "---|" * 10]
    for r in results:
        vs = f"{r.vs_generate:.2f}x" if r.vs_generate is not None else "-"
        cu = f"{r.cached_vs_uncached:.2f}x" if r.cached_vs_uncached is not None else "-"
        lines.append(
            f"| {r.method} | {r.batch} | {r.new_tokens} | {r.seconds:.1f} | {r.tokens_per_s:.1f} | "
            f"{r.nfe_per_token:.2f} | {r.ms_per_forward:.0f} | {r.tokens_per_step:.2f} | {vs} | {cu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved diffusion student (default: random SmolLM2-135M-shaped model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["HF generate", *METHODS], choices=["HF generate", *METHODS])
    parser.add_argument("--uncached-max-tokens", type=int, default=None, help="skip uncached above this length")
    parser.add_argument("--uncached-max-batch", type=int, default=None, help="skip uncached above this batch")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin repeats; the fastest run is kept")
    parser.add_argument("--shift", action="store_true", help="convert the random model as a shifted student")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 1/2, 16/32 tokens (seconds)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.new_tokens, args.prompt_length = [1, 2], [16, 32], 6
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    model, description = load_student(args)
    pad_id = 0
    vocab = model.config.opdlm["teacher_vocab_size"]
    warm = random_prompts(1, args.prompt_length, vocab, seed=1)
    time_generate(model, warm, 4, pad_id)
    time_sampler(model, warm, 4, pad_id, "static b4 cached")

    results: list[Result] = []
    for batch in args.batch_sizes:
        prompts = random_prompts(batch, args.prompt_length, vocab, seed=0)
        for new_tokens in args.new_tokens:
            methods = [m for m in args.methods if not skip_uncached(m, batch, new_tokens, args)]
            best: dict[str, Result] = {}
            for _ in range(args.repeats):  # round-robin, keep the fastest: robust to other jobs on the CPUs
                for method in methods:
                    if method == "HF generate":
                        result = time_generate(model, prompts, new_tokens, pad_id)
                    else:
                        result = time_sampler(model, prompts, new_tokens, pad_id, method)
                    if method not in best or result.seconds < best[method].seconds:
                        best[method] = result
                    print(
                        f"{method:>20} batch {batch} tokens {new_tokens}: {result.tokens_per_s:.1f} tok/s", flush=True
                    )
            results.extend(best[m] for m in methods)
    add_ratios(results)
    load = (load_before, os.getloadavg()[0])
    print(f"\nmodel: {description}; prompt {args.prompt_length} tokens; torch threads {torch.get_num_threads()}")
    print(
        f"1-min load average before/after: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} CPUs (others' jobs slow this)"
    )
    print(table(results))
    if args.output:
        payload = {
            "model": description,
            "prompt_length": args.prompt_length,
            "threads": torch.get_num_threads(),
            "load_average_before_after": load,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "results": [asdict(r) for r in results],
        }
        with open(args.output, "w") as handle:
            json.dump(payload, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
