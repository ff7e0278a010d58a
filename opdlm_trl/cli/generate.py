"""Generate with a converted (or trained) diffusion student from the command line: ``opdlm-generate``.

    opdlm-generate --model out/student --prompt "Write a function that adds two numbers."
    opdlm-generate --model out/student --prompts-file prompts.txt --chat \\
        --remasking dynamic --threshold 0.9 --max-new-tokens 128 --batch-size 4 --output answers.jsonl
    opdlm-generate --model out/qwen3-student --chat --chat-template-kwargs '{"enable_thinking": false}' \\
        --prompt "Sort a list in Python."

Prompts are wrapped in the tokenizer's chat template with ``--chat`` (one user turn each; template variables
such as Qwen3's ``enable_thinking`` from ``--chat-template-kwargs``), else fed as plain text, rendered by
``opdlm_trl.data.render_prompts`` exactly as training rendered them. Sampler options mirror
:class:`opdlm_trl.sampling.SamplerConfig` (docs/sampling.md). ``python -m opdlm_trl.cli.generate`` and
``python examples/generate.py`` are the same command.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm.auto import tqdm

from ..data import parse_chat_template_kwargs, render_prompts
from ..modeling import load_diffusion_model
from ..sampling import (
    COMMIT_RULES,
    CONFIDENCE,
    REMASKING,
    DiffusionSampler,
    SamplerConfig,
    default_stop_token_ids,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opdlm-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="directory of a saved diffusion student")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--chat", action="store_true", help="apply the chat template (one user message per prompt)")
    parser.add_argument(
        "--chat-template-kwargs",
        "--chat_template_kwargs",
        type=_json_object,
        default={},
        help="chat-template variables as a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3 non-thinking)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=None, help="default: the model's block size")
    parser.add_argument("--steps-per-block", type=int, default=None, help="default: block size (1 token/step)")
    parser.add_argument("--remasking", choices=REMASKING, default="static")
    parser.add_argument(
        "--commit-order",
        choices=tuple(COMMIT_RULES),
        default=SamplerConfig.commit_order,
        help="confidence: the most confident anywhere in the block; left_to_right: from the block's frontier",
    )
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--confidence", choices=CONFIDENCE, default="prob")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole canvas each step (slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write JSON lines {prompt, completion, finish_reason, nfe} here")
    return parser.parse_args(argv)


def _json_object(text: str) -> dict:
    try:
        return parse_chat_template_kwargs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as handle:
            prompts.extend(line.rstrip("\n") for line in handle if line.strip())
    if not prompts:
        raise SystemExit("Give at least one --prompt or a --prompts-file.")
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    model, tokenizer = load_diffusion_model(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    config = SamplerConfig.from_options(
        args, stop_token_ids=default_stop_token_ids(tokenizer, model), use_cache=not args.no_cache
    )
    sampler = DiffusionSampler(config, pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    inputs = [[{"role": "user", "content": p}] for p in prompts] if args.chat else prompts
    encoded = render_prompts(inputs, tokenizer, args.chat_template_kwargs)
    output = open(args.output, "w") if args.output else None
    try:
        for start in tqdm(range(0, len(encoded), args.batch_size), desc="batches", unit="batch"):
            rollout = sampler.sample(model, encoded[start : start + args.batch_size], generator=generator)
            for offset, text in enumerate(rollout.texts(tokenizer)):
                record = {
                    "prompt": prompts[start + offset],
                    "completion": text,
                    "finish_reason": rollout.finish_reason[offset],
                    "tokens_per_step": rollout.tokens_per_step,
                    "nfe": rollout.nfe,
                }
                if output:
                    output.write(json.dumps(record) + "\n")
                else:
                    tqdm.write(f"### {record['prompt']}\n{text}\n", file=sys.stdout)
    finally:
        if output:
            output.close()


if __name__ == "__main__":
    main()
