"""Where a LoRA student's decoding time goes: plain student vs peft's per-forward paths vs the sampler's merged rows.

Not a test: prints a table and writes JSON. Every configuration decodes the same prompts with static decoding, one
token a step and no stops, so each makes exactly ``new_tokens`` forwards per block row and the times compare
forward for forward. Configurations, round-robin in one process (the fastest of ``--repeats`` runs is kept):

* ``plain``: the converted student without peft (the floor);
* ``lora, rows rebuilt``: LoRA on every linear layer plus the mask row as a peft trainable token, decoded the way
  the sampler did before ``trainable_tokens_merged``: peft rebuilds the whole ``(V, H)`` embedding matrix (and a
  tied ``lm_head``'s) on every forward;
* ``lora, rows merged``: the same model through today's sampler: the mask row is written into the frozen embedding
  once per decode (exact: identical logits);
* ``lora without mask row``: LoRA only, no trainable token (what the LoRA matmuls alone cost);
* ``lora merged into weights``: ``merge_and_unload()``: what a LoRA student costs once merged for inference.

The default model is a random SmolLM2-135M-shaped one (``opdlm_trl.tiny.smollm2_shaped_model``; the cost of a
forward depends on the shape, not the weights), run under bf16 autocast with float32 weights as the CPU recipes
train (``--no-autocast``: float32).

    python benchmarks/lora_decode.py --output benchmarks/out/lora_decode.json
    python benchmarks/lora_decode.py --smoke          # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from unittest import mock

import torch

import opdlm_trl.sampling as sampling
from opdlm_trl.modeling import to_diffusion
from opdlm_trl.sampling import DiffusionSampler, SamplerConfig
from opdlm_trl.tiny import smollm2_shaped_model, tiny_model, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGURATIONS = (
    "plain",
    "lora, rows rebuilt",
    "lora, rows merged",
    "lora without mask row",
    "lora merged into weights",
)


def _student(smoke: bool):
    """A converted student and its tokenizer (the tiny tokenizer: decoding speed does not depend on the text)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2") if smoke else smollm2_shaped_model()
    model, tokenizer = to_diffusion(model, tokenizer, block_size=4, shift=True)
    return model.eval(), tokenizer


def _models(smoke: bool) -> dict:
    """Each configuration's model (separate copies: peft wraps in place) and the mask id."""
    from peft import LoraConfig, get_peft_model

    def lora(mask_row: bool):
        model, tokenizer = _student(smoke)
        rows = [tokenizer.mask_token_id] if mask_row else None
        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, trainable_token_indices=rows)
        return get_peft_model(model, config).eval()

    with_row = lora(True)
    return {
        "plain": _student(smoke)[0],
        "lora, rows rebuilt": with_row,
        "lora, rows merged": with_row,
        "lora without mask row": lora(False),
        "lora merged into weights": lora(True).merge_and_unload().eval(),
    }


def _decode(model, prompts: torch.Tensor, new_tokens: int, rebuilt: bool, autocast: bool) -> tuple[float, int]:
    sampler = DiffusionSampler(SamplerConfig(max_new_tokens=new_tokens, remasking="static"), pad_token_id=0)
    # the previous code path: peft's own forward, which rebuilds the rows' matrices every step
    rows = mock.patch.object(sampling, "trainable_tokens_merged", contextlib.nullcontext)
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with rows if rebuilt else contextlib.nullcontext(), precision:
        start = time.perf_counter()
        rollout = sampler.sample(model, prompts, attention_mask=torch.ones_like(prompts))
        return time.perf_counter() - start, rollout.nfe


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the fastest run is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-autocast", action="store_true", help="float32 instead of bf16 autocast")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat, 8 tokens (seconds)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.prompt_length, args.new_tokens, args.repeats = 2, 8, 8, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = _models(args.smoke)
    prompts = torch.randint(1, 100, (args.batch, args.prompt_length))
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):
        for name in CONFIGURATIONS:
            seconds, nfe = _decode(
                models[name], prompts, args.new_tokens, name == "lora, rows rebuilt", not args.no_autocast
            )
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, nfe)
    floor = best["plain"][0]
    results = [
        {
            "configuration": name,
            "seconds": round(seconds, 3),
            "nfe": nfe,
            "ms_per_forward": round(1000 * seconds / nfe, 2),
            "vs_plain": round(seconds / floor, 3),
        }
        for name, (seconds, nfe) in best.items()
    ]
    print("| configuration | s | forwards | ms/forward | time vs plain |\n|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['configuration']} | {r['seconds']:.2f} | {r['nfe']} | {r['ms_per_forward']:.1f} | {r['vs_plain']:.2f}x |"
        )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        settings = {key: value for key, value in vars(args).items() if key != "output"}
        record = {"settings": settings, "machine": platform.processor() or platform.machine(), "results": results}
        with open(args.output, "w") as handle:
            json.dump(record, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
