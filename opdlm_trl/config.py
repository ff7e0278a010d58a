"""The trainers' configs, TRL-style (dataclass fields with ``help``).

:class:`DiffusionTrainingConfig` holds what every trainer of the package reads (the student's conversion, the
teacher and its divergence, loss reduction and chunking, prompts, precision, export); :class:`OPDConfig` adds the
rollouts (sampler, threshold ramp, state selection, length curriculum). The given-text baselines' config
(:class:`opdlm_trl.baselines.MDLMConfig`) adds its masking fields to the base and has no rollout field.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ._trl import DistillationConfig
from .curriculum import RAMPS, SCHEDULES
from .losses import DIVERGENCES, NORMALIZATIONS
from .sampling import COMMIT_RULES, SamplerConfig
from .states import SELECTIONS
from .teachers.factory import AUTO, TEACHERS, teacher_class

__all__ = ["DiffusionTrainingConfig", "OPDConfig"]

# Each choice lives in the module that implements it; "auto" is the trainer's own (it resolves to a teacher kind
# from peft_config / teacher_model). Losses, teacher backends and commit rules are registries (losses.DIVERGENCES,
# teachers.TEACHERS, sampling.COMMIT_RULES): the checks read them when a config is made, the help text lists them at
# import. The sampler's choices (commit_order among them) are checked by SamplerConfig itself (__post_init__).
_PROMPT_TRUNCATIONS = ("error", "left")


def _registered(registry: dict[str, Any]) -> str:
    """``'name': summary; ...`` of a registry for its help text, each summary the first line of the entry's docstring."""

    def summary(entry) -> str:
        doc = (entry.__doc__ or "").strip()
        return f": {doc.splitlines()[0].rstrip('.')}" if doc else ""

    return "; ".join(f"'{name}'{summary(entry)}" for name, entry in registry.items())


_LOSS_TYPE_HELP = (
    "Per-position loss, a name registered in opdlm_trl.losses.DIVERGENCES (add one with register_divergence): "
    f"{_registered(DIVERGENCES)}."
)
_COMMIT_ORDER_HELP = (
    "Which masked positions a rollout step commits, a rule registered in opdlm_trl.sampling.COMMIT_RULES (add one "
    f"with register_commit_rule): {_registered(COMMIT_RULES)}."
)
_TEACHER_BACKEND_HELP = (
    f"'{AUTO}' (shared with peft and no teacher model, local otherwise) or a kind registered in "
    f"opdlm_trl.teachers.TEACHERS (add one with register_teacher): {_registered(TEACHERS)}."
)


@dataclass
class DiffusionTrainingConfig(DistillationConfig):
    r"""What every trainer of the package reads: [`OPDTrainer`] and the given-text baselines alike.

    Extends TRL's `DistillationConfig`: the student's conversion (`block_size`, `mask_token`, `shift`), the teacher
    and the divergence to it (read by the trainers that distil from a teacher), the loss's reduction and chunking,
    row grouping, prompts, precision and export. `use_vllm` (student generation with vLLM) is refused: a diffusion
    student decodes with the package's block sampler. The *teacher* can be vLLM-served (`teacher_backend`).
    Subclasses add their own fields ([`OPDConfig`]: the rollouts; `MDLMConfig`: random masks of given text).
    """

    # Overridden TRL defaults
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate (paper: 1e-5)."})
    max_completion_length: int | None = field(
        default=256,
        metadata={
            "help": "Longest completion in tokens, rounded up to a block: OPD's final rollout length (the length "
            "curriculum's end); the given-text baselines truncate their completions to it."
        },
    )

    # Diffusion student
    block_size: int = field(
        default=4,
        metadata={
            "help": "Tokens per denoising block of the student (paper: 4). Ignored if the model is "
            "already a converted student (its own setting is used)."
        },
    )
    mask_token: str | None = field(
        default=None,
        metadata={
            "help": "Mask token string; default: the tokenizer's own, else a free embedding row, else a new "
            "token (see docs/conversion.md)."
        },
    )
    shift: bool = field(
        default=True,
        metadata={
            "help": "Shifted student: token i is read from the logit at i-1 (Dream / Fast-dLLM v2); the "
            "default because it converted far faster in docs/results.md. The paper's recipe is shift=False."
        },
    )

    # Teacher targets and loss
    loss_type: str = field(default="forward_kl", metadata={"help": _LOSS_TYPE_HELP})
    teacher_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Restrict the divergence to the teacher's top-k tokens (reference: 16 at 4B/8B). None = "
            "full vocabulary (local/shared teachers only)."
        },
    )
    tail_bucket: bool = field(
        default=False,
        metadata={"help": "With teacher_top_k: add the leftover probability mass as one extra category."},
    )
    loss_normalization: str = field(
        default="sequence",
        metadata={
            "help": "'sequence': per-row mean over supervised positions, then mean over rows (reference "
            "code); 'token': global mean over all supervised tokens of the batch."
        },
    )

    # Teacher
    teacher_backend: str = field(default=AUTO, metadata={"help": _TEACHER_BACKEND_HELP})
    teacher_url: str | None = field(
        default=None, metadata={"help": "Base URL of the vLLM server scoring the teacher (vllm_server backend)."}
    )
    teacher_model_name: str | None = field(
        default=None, metadata={"help": "Model name on the vLLM server (default: the only one it serves)."}
    )
    teacher_timeout: float = field(default=120.0, metadata={"help": "Seconds per teacher-server request."})
    teacher_max_retries: int = field(default=3, metadata={"help": "Retries of a failed teacher-server request."})
    teacher_max_concurrency: int = field(default=4, metadata={"help": "Parallel requests to the teacher server."})
    teacher_max_tokens_per_request: int = field(
        default=8192,
        metadata={
            "help": "Prompt + completion tokens per scoring request to the vLLM server: rows are packed into requests "
            "up to this many tokens (a longer row goes alone). Bounds the response (~1 KB of JSON per token at "
            "top-16) and what the server holds per request (it prefills in steps of its --max-num-batched-tokens)."
        },
    )
    teacher_chunk_size: int = field(
        default=1024,
        metadata={"help": "Positions per lm_head chunk when scoring with a local/shared teacher (memory bound)."},
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Supervised positions per chunk of the loss: the student's and the teacher's output heads are "
            "applied to hidden states this many positions at a time under activation checkpointing, so at most one "
            "chunk's (chunk, vocabulary) float32 tensors exist (~0.6 GB each at Qwen3's 151,936 tokens and 1,024). "
            "Values and gradients do not depend on it."
        },
    )
    teacher_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU memory fraction of the in-process vLLM teacher (vllm_colocate)."}
    )
    length_groups: int = field(
        default=4,
        metadata={
            "help": "Forward the student (and a local/shared teacher) in this many row groups of similar length, "
            "each cut to the columns its rows use: the same values with less padding (exact up to float rounding; "
            "~1.3-1.5x faster steps on prompts of mixed length). Every process runs the same number of forwards. "
            "0 = one padded batch (the previous path)."
        },
    )

    # Prompts and export
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Longest prompt in tokens; longer prompts follow `prompt_truncation`."}
    )
    prompt_truncation: str = field(
        default="error",
        metadata={"help": "'error' (refuse over-long prompts, naming the row) or 'left' (keep the last tokens)."},
    )
    allow_bf16_master_weights: bool = field(
        default=False,
        metadata={
            "help": "Let the optimizer update bf16/fp16 trainable parameters in place (a full fine-tune of a model "
            "loaded in bf16 without DeepSpeed). Off: such a trainer is refused, because AdamW rounds most updates "
            "away; load float32 with `bf16: true` (autocast) or use DeepSpeed bf16 instead (opdlm_trl.precision)."
        },
    )
    merge_lora_on_save: bool = field(
        default=False,
        metadata={
            "help": "With peft: the final `save_model` also writes a merged full student to `<output_dir>/merged`."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_choices()
        self._validate_numbers()
        if self.use_vllm:
            raise ValueError(
                "use_vllm=True asks TRL to generate the student's rollouts with vLLM, but a diffusion student "
                "decodes with opdlm_trl's block sampler. To serve the *teacher* with vLLM set "
                "teacher_backend='vllm_server' (teacher_url=...) or 'vllm_colocate'."
            )

    def teacher_options(self, kind: str | None = None) -> dict[str, Any]:
        """:func:`opdlm_trl.teachers.build_teacher`'s options for a backend ``kind`` (default ``teacher_backend``),
        read from the config fields its class names (``TeacherBackend.option_fields``).

        Only that backend's fields: each backend's builder refuses options it does not take. ``"auto"`` must be
        resolved first (:func:`opdlm_trl.teachers.factory.resolve_kind`): its two kinds take different models.
        """
        kind = self.teacher_backend if kind is None else kind
        if kind == AUTO:
            raise ValueError(
                "teacher_options needs a resolved kind: resolve 'auto' with teachers.factory.resolve_kind."
            )
        return {keyword: getattr(self, name) for keyword, name in teacher_class(kind).option_fields.items()}

    def _choices(self) -> tuple[tuple[str, tuple, str], ...]:
        """``(field, allowed values, hint)`` of every field with a fixed set of choices; subclasses add theirs."""
        return (
            ("loss_type", tuple(DIVERGENCES), " Register a new loss with opdlm_trl.losses.register_divergence."),
            ("teacher_backend", (AUTO, *TEACHERS), " Register a new one with opdlm_trl.teachers.register_teacher."),
            ("loss_normalization", NORMALIZATIONS, ""),
            ("prompt_truncation", _PROMPT_TRUNCATIONS, ""),
        )

    def _validate_choices(self) -> None:
        for name, allowed, hint in self._choices():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}.{hint}")
        backend = None if self.teacher_backend == AUTO else teacher_class(self.teacher_backend)
        if backend is not None and not backend.full_vocabulary and self.teacher_top_k is None:
            raise ValueError(
                f"teacher_backend={self.teacher_backend!r} returns top-k log-probs only: set teacher_top_k "
                "(e.g. 16 as in the paper's reference code)."
            )
        if self.teacher_backend == "vllm_colocate" and self.world_size > 1:
            raise ValueError(
                f"teacher_backend='vllm_colocate' under {self.world_size} processes is not supported: each process "
                "would start an in-process vLLM engine that is not set up for the training's process group (TRL's "
                "colocated vLLM needs its external_launcher executor, per-rank RANK/WORLD_SIZE, seeds and memory "
                "settings). Serve the teacher once with teacher_backend='vllm_server' (scripts/vllm_server.sh; all "
                "ranks share it), or train in one process."
            )
        if self.teacher_backend == "vllm_server" and not self.teacher_url:
            raise ValueError("teacher_backend='vllm_server' needs teacher_url, e.g. http://127.0.0.1:8000.")

    def _validate_numbers(self) -> None:
        if self.block_size is None or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size}.")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError("max_completion_length must be a positive number of tokens.")
        if self.loss_chunk_size < 1 or self.teacher_chunk_size < 1:
            raise ValueError("loss_chunk_size and teacher_chunk_size must be >= 1 (positions per output-head chunk).")
        if self.teacher_max_tokens_per_request < 1:
            raise ValueError("teacher_max_tokens_per_request must be >= 1 (tokens per vLLM scoring request).")
        if self.length_groups < 0:
            raise ValueError("length_groups must be >= 0 (0 = one padded batch).")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ValueError("teacher_top_k must be a positive integer or None.")
        if self.tail_bucket and self.teacher_top_k is None:
            raise ValueError("tail_bucket=True needs teacher_top_k (the bucket is the mass outside the top-k).")


@dataclass
class OPDConfig(DiffusionTrainingConfig):
    r"""Configuration of [`OPDTrainer`]: on-policy self-distillation of an ARLM into a block-diffusion LM.

    Extends [`DiffusionTrainingConfig`] with the rollouts. Inherited fields keep their TRL meaning where it applies:
    `temperature`, `top_p`, `top_k` control the student's *rollout* sampler (the loss always compares distributions
    at temperature 1, as the method prescribes), `max_completion_length` is the final rollout length of the length
    curriculum, and `beta` is the JSD interpolation when `loss_type="jsd"` (TRL convention: 0 = forward KL,
    1 = reverse KL). `use_vllm` (student generation with vLLM) is refused: the student decodes with the diffusion
    sampler. The *teacher* can be vLLM-served (`teacher_backend`).

    Defaults follow the paper's training recipe (docs/method.md §7): block 4, dynamic decoding at threshold 0.9 and
    temperature 1.0, one state per block, full-vocabulary forward KL, per-sequence normalisation.
    """

    # Rollout sampler
    steps_per_block: int | None = field(
        default=None,
        metadata={
            "help": "Denoising steps per block for static decoding (commits block_size/steps tokens a step). "
            "Default: block_size (one token per step)."
        },
    )
    remasking: str = field(
        default="dynamic",
        metadata={
            "help": "Rollout commit rule: 'dynamic' (every masked token with confidence >= threshold, at "
            "least the static count) or 'static' (a fixed number per step)."
        },
    )
    commit_order: str = field(default=SamplerConfig.commit_order, metadata={"help": _COMMIT_ORDER_HELP})
    threshold: float = field(
        default=0.9,
        metadata={
            "help": "Confidence threshold of dynamic decoding: in [0, 1] for 'prob' and 'margin', <= 0 for "
            "'entropy' (a negative entropy, e.g. -0.5)."
        },
    )
    confidence: str = field(
        default="prob", metadata={"help": "Confidence score: 'prob', 'margin' (top1 - top2) or 'entropy'."}
    )
    threshold_final: float | None = field(
        default=None,
        metadata={
            "help": "Ramp the rollout threshold from `threshold` to this value (reference code: 0.9 -> 0.7, off in "
            "its launchers), so late rollouts commit several tokens a step. None: `threshold` throughout."
        },
    )
    threshold_hold_steps: int = field(
        default=0, metadata={"help": "Optimizer steps the rollout threshold stays at `threshold` before its ramp."}
    )
    threshold_ramp_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of the threshold ramp after the hold; None: until the end of training."},
    )
    threshold_schedule: str = field(
        default="cosine",
        metadata={"help": "Shape of the threshold ramp: 'cosine' (reference code: 1 - cos, slow start) or 'linear'."},
    )
    use_kv_cache: bool = field(
        default=True, metadata={"help": "Decode rollouts with the exact block KV cache (False: full canvas)."}
    )

    # Training states
    state_selection: str = field(
        default="per_block",
        metadata={
            "help": "Which visited states are trained: 'per_block' (one uniformly chosen step per block, "
            "reference code), 'global_step' (one step of the whole trajectory, paper Alg. 1), 'every_step' "
            "(every visited state once: up to block_size copies of each row, as many times the student's "
            "forward) or 'random_remask' (random masks on the on-policy x0: the OPDLM_off ablation)."
        },
    )
    exclude_stop_token: bool = field(
        default=False,
        metadata={
            "help": "Never supervise the stop (end-of-turn) token of a rollout that ended on one, as the paper's "
            "reference code does. Default False: the stop is supervised like any token, so the student learns "
            "where to end (not measured against True; see docs/trainer.md)."
        },
    )

    # Length curriculum
    min_completion_length: int | None = field(
        default=None,
        metadata={"help": "Rollout length at step 0 of the curriculum (default: max_completion_length)."},
    )
    curriculum_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which the rollout length ramps from min to max."}
    )
    curriculum: str = field(
        default="linear",
        metadata={"help": "'linear' (paper), 'cosine' (reference code: 1 - cos(pi/2 * s/S)) or 'none'."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.steps_per_block is None:
            self.steps_per_block = self.block_size
        if self.min_completion_length is None:
            self.min_completion_length = self.max_completion_length
        self.rollout_sampler_config()  # every sampler field fails here, with the sampler's own rule
        if self.threshold_final is not None:
            if self.remasking != "dynamic":
                raise ValueError(
                    f"threshold_final={self.threshold_final} ramps the threshold of dynamic decoding, but "
                    f"remasking={self.remasking!r} commits a fixed count: set remasking='dynamic' or drop threshold_final."
                )
            self.rollout_sampler_config(threshold=self.threshold_final)  # the same rule for the ramp's end

    def rollout_sampler_config(self, **overrides) -> SamplerConfig:
        """The student's rollout sampler as these options describe it (``overrides`` win, e.g. the curriculum's
        ``max_new_tokens`` or the tokenizer's ``stop_token_ids``).

        The one mapping from config fields to :class:`opdlm_trl.sampling.SamplerConfig`: `__post_init__` calls it
        so that a bad sampler setting fails when the config is made rather than at the first rollout, and the
        trainer calls it for every rollout.
        """
        defaults = {
            "block_size": self.block_size,
            "max_new_tokens": self.max_completion_length,
            "use_cache": self.use_kv_cache,  # TrainingArguments.use_cache is the HF generation flag, not ours
        }
        return SamplerConfig.from_options(self, **{**defaults, **overrides})

    def _choices(self) -> tuple[tuple[str, tuple, str], ...]:
        return (
            *super()._choices(),
            ("state_selection", SELECTIONS, ""),
            ("curriculum", SCHEDULES, ""),
            ("threshold_schedule", RAMPS, ""),
        )

    def _validate_numbers(self) -> None:
        super()._validate_numbers()
        if (
            self.min_completion_length is not None
            and not 1 <= self.min_completion_length <= self.max_completion_length
        ):
            raise ValueError("min_completion_length must be in [1, max_completion_length].")
        if self.curriculum_steps < 0:
            raise ValueError("curriculum_steps must be >= 0.")
        if self.threshold_hold_steps < 0 or (self.threshold_ramp_steps is not None and self.threshold_ramp_steps < 1):
            raise ValueError("threshold_hold_steps must be >= 0 and threshold_ramp_steps >= 1 (or None: to the end).")


def fields_markdown() -> str:
    """docs/config.md: the fields `OPDConfig` adds to TRL's `DistillationConfig` (new ones and TRL fields whose default
    or help it changes), their defaults and their `help` text, the same text `--help` prints.

    Generated rather than written, so the reference cannot drift from the code (a test compares the committed page
    with this function's output): ``python -m opdlm_trl.config --markdown > docs/config.md``.
    """
    trl_fields = {item.name: item for item in fields(DistillationConfig)}
    rows = []
    for item in fields(OPDConfig):
        trl_field = trl_fields.get(item.name)
        ours = trl_field is None or (item.default, item.metadata) != (trl_field.default, trl_field.metadata)
        if ours:  # TRL's own fields are TRL's to document; fields of package base classes are included
            default = "(computed)" if item.default is MISSING else item.default
            help_text = " ".join(item.metadata.get("help", "").split()).replace("|", "\\|")
            rows.append(f"| `{item.name}` | `{default}` | {help_text} |")
    return "\n".join(
        [
            "# `OPDConfig` fields",
            "",
            "<!-- Generated by `python -m opdlm_trl.config --markdown > docs/config.md` from the fields' `help` "
            "metadata in opdlm_trl/config.py: edit the help there, then regenerate. -->",
            "",
            "The fields `OPDConfig` adds to TRL's `DistillationConfig` (or whose default it changes), in the order "
            "`--help` lists them (TRL's own fields, between them there, are left out). Every other field keeps TRL's "
            "meaning, except as the class says:",
            "",
            *(f"> {line}".rstrip() for line in inspect.getdoc(OPDConfig).splitlines()),
            "",
            "Why the rollouts, states, losses, teachers and curriculum work as they do: docs/trainer.md.",
            "",
            "| field | default | help |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


if __name__ == "__main__":  # `python -m opdlm_trl.config --markdown`: docs/config.md on stdout
    import sys

    if sys.argv[1:] != ["--markdown"]:
        raise SystemExit("usage: python -m opdlm_trl.config --markdown > docs/config.md")
    print(fields_markdown(), end="")
