"""bf16 training and gradient checkpointing on CPU, with the block-causal ``[prompt | x0 | x_t]`` training layout.

* bf16: student and teacher in bfloat16 and ``bf16=True``; the additive attention masks are built in the model's
  dtype (a float32 ``finfo.min`` mask added to bf16 scores would overflow), and nothing is NaN — logits of every
  forward, the loss, the gradients — also for a row whose rollout stopped at its first token and for a row that is
  padding only (every completion key masked: each query then attends only itself).
* Gradient checkpointing recomputes the layers in the backward pass; with the 4D block-causal mask it must give the
  gradients of the plain forward (float32; measured bitwise equal on CPU, asserted to 1e-6 relative), for a full
  fine-tune (non-reentrant) and for LoRA with reentrant checkpointing (what TRL forces under ZeRO-3 + peft, and
  where the inputs need ``enable_input_require_grads``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from opdlm_trl import OPDTrainer, precision
from opdlm_trl.modeling import unwrap_model
from opdlm_trl.precision import check_master_weights
from opdlm_trl.sampling import DiffusionSampler
from opdlm_trl.states import select_states
from opdlm_trl.tiny import tiny_model
from tests import helpers
from tests.helpers import PROMPTS, cpu_config

COMPLETION = 12


def make_trainer(output_dir, model, peft_config=None, **overrides) -> OPDTrainer:
    """One step of 12-token rollouts with raw gradients, at OPDConfig's default learning rate, logging interval and
    gradient checkpointing."""
    settings = dict(
        max_steps=1,
        max_completion_length=COMPLETION,
        max_grad_norm=0.0,  # record raw gradients
        learning_rate=1e-5,
        logging_steps=10,
        gradient_checkpointing=True,
    )
    return helpers.make_trainer(output_dir, model, peft_config, **{**settings, **overrides})


class GradientRecorder(TrainerCallback):
    def __init__(self):
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class ForwardProbe:
    """Dtype of the 4D attention mask and finiteness of the logits of every student forward."""

    def __init__(self, model):
        self.mask_dtypes: set = set()
        self.finite: list[bool] = []
        unwrap_model(model).register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            self.mask_dtypes.add(mask.dtype)
        self.finite.append(bool(torch.isfinite(output.logits).all()))


def greedy_first_tokens(trainer: OPDTrainer) -> list[int]:
    sampler = DiffusionSampler(trainer.sampler_config(COMPLETION), pad_token_id=trainer._tokenizer.pad_token_id)
    rollout = trainer.rollout(PROMPTS, sampler=sampler)
    return rollout.completion_ids[:, 0].tolist()


def test_bf16_training_step_is_finite_with_an_at_once_stopped_and_a_padding_row(tmp_path):
    # seed 2: greedy rollouts of the random tiny model start with two different tokens (checked below)
    # bf16 weights trained in place on purpose (the opt-in by name): the test is about NaNs in bf16 forwards
    trainer = make_trainer(
        tmp_path,
        tiny_model("llama", dtype=torch.bfloat16, seed=2),
        bf16=True,
        temperature=0.0,
        logging_steps=1,
        allow_bf16_master_weights=True,
    )
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert next(trainer.teacher.model.parameters()).dtype == torch.bfloat16
    first = greedy_first_tokens(trainer)
    assert len(set(first)) > 1, f"precondition: rows must start differently, got {first}"
    trainer.eos_token_ids = [*trainer.eos_token_ids, first[0]]  # rows starting with it stop at their first token
    batches: list[dict] = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: batches.append(generate(inputs)) or batches[-1]
    probe, recorder = ForwardProbe(trainer.model), GradientRecorder()
    trainer.add_callback(recorder)
    trainer.train()

    (batch,) = batches
    stopped_at_once = batch["completion_ids"][:, 0] == first[0]
    assert stopped_at_once.any() and not stopped_at_once.all()  # an at-once stop next to longer rows
    assert batch["loss_mask"][~stopped_at_once].sum(1).max() > 1
    loss = trainer.state.log_history[0]["loss"]
    assert probe.mask_dtypes == {torch.bfloat16} and all(probe.finite) and len(probe.finite) > 1
    assert loss == loss and 0 < abs(loss) < float("inf")
    (gradients,) = recorder.gradients
    assert all(torch.isfinite(g).all() for g in gradients.values()) and any(g.any() for g in gradients.values())

    # A row of padding only (no completion, nothing supervised) in the same bf16 training forward.
    padded = {key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()}
    padded["completion_ids"][0] = trainer._tokenizer.pad_token_id
    padded["clean_ids"][0] = trainer._tokenizer.pad_token_id
    padded["noisy_ids"][0] = trainer.settings.mask_token_id
    padded["completion_key_mask"][0] = 0
    padded["loss_mask"][0] = False
    trainer.model.train()
    trainer.model.zero_grad()
    probe.finite.clear()
    loss = trainer.compute_loss(trainer.model, padded)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and probe.finite == [True] * len(probe.finite) and probe.finite
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


class LinearOutputDtypes:
    """Output dtypes of one linear layer, split by grad mode: rollouts and teacher scoring run without grad."""

    def __init__(self, model):
        self.dtypes: dict[bool, set] = {True: set(), False: set()}
        layer = next(m for m in unwrap_model(model).modules() if isinstance(m, torch.nn.Linear))
        layer.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.dtypes[torch.is_grad_enabled()].add(output.dtype)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_bf16_mixed_precision_reaches_every_forward_of_a_step(tmp_path, bf16):
    """``bf16=True`` with float32 weights: rollout, teacher scoring and the loss forward all compute in bf16.

    accelerate autocasts only the prepared model's ``forward``; the local teacher scores through its backbone and
    a chunked head, so without the trainer's own autocast it stayed in float32 (3x slower on a bf16 CPU).
    """
    trainer = make_trainer(tmp_path, tiny_model("llama"), bf16=bf16)  # a local frozen copy as the teacher
    assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay float32
    student, scorer = LinearOutputDtypes(trainer.model), LinearOutputDtypes(trainer.teacher.model)
    result = trainer.train()
    expected = {torch.bfloat16 if bf16 else torch.float32}
    assert student.dtypes[False] == expected  # the rollout
    assert student.dtypes[True] == expected  # the training forward
    assert scorer.dtypes[False] == expected and not scorer.dtypes[True]  # the frozen teacher, never with grad
    assert 0 < result.training_loss < float("inf")


@pytest.mark.parametrize("configured", [False, True], ids=["fp32-config", "bf16-config"])
def test_the_precision_setting_overrides_the_config_for_one_block(tmp_path, configured):
    """``trainer.precision(bf16)`` sets the autocast of the rollout, the teacher's scoring and the loss forward for the
    block, then the config's precision is back (how benchmarks/train_step.py compares both on one trainer)."""
    trainer = make_trainer(tmp_path, tiny_model("llama"), bf16=configured)
    student, scorer = LinearOutputDtypes(trainer.model), LinearOutputDtypes(trainer.teacher.model)

    def step_dtypes() -> tuple[set, set, set]:
        for probe in (student, scorer):
            probe.dtypes = {True: set(), False: set()}
        rollout = trainer.rollout(PROMPTS)
        targets = trainer.score(rollout)
        batch = trainer.training_batch(rollout, targets, select_states(rollout, "per_block"))
        trainer.model.train()
        trainer.compute_loss(trainer.model, batch.to_dict()).backward()
        return student.dtypes[False], scorer.dtypes[False], student.dtypes[True]

    dtype = {True: {torch.bfloat16}, False: {torch.float32}}
    with trainer.precision(not configured):
        assert step_dtypes() == (dtype[not configured],) * 3  # rollout, teacher, loss forward
    assert step_dtypes() == (dtype[configured],) * 3


@pytest.mark.parametrize(
    ("peft", "use_reentrant"),
    [(False, False), (True, True)],  # full fine-tune; LoRA with TRL's reentrant mode (forced under ZeRO-3 + peft)
    ids=["full-nonreentrant", "lora-reentrant"],
)
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_forward(tmp_path, peft, use_reentrant):
    """Same seed, same rollout; recomputation is checked to happen (attention runs again in the backward)."""
    gradients, attention_calls = {}, {}
    for checkpointing in (False, True):
        trainer = make_trainer(
            tmp_path / str(checkpointing),
            tiny_model("llama"),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if peft else None,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant} if checkpointing else None,
        )
        calls = []
        attention = unwrap_model(trainer.model).model.layers[0].self_attn
        attention.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(torch.is_grad_enabled()))
        recorder = GradientRecorder()
        trainer.add_callback(recorder)
        trainer.train()
        (gradients[checkpointing],) = recorder.gradients
        attention_calls[checkpointing] = len(calls)
    assert attention_calls[True] > attention_calls[False], attention_calls  # the layers were recomputed
    plain, checkpointed = gradients[False], gradients[True]
    assert plain.keys() == checkpointed.keys() and len(plain) >= (5 if peft else 10)
    # (LoRA's A matrices get zero gradients at step 0: B starts at zero)
    assert sum(bool(grad.any()) for grad in plain.values()) >= len(plain) // 2
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------------- master weights and CPU bf16
def test_a_bf16_full_fine_tune_is_refused_naming_the_fixes(tmp_path):
    with pytest.raises(
        ValueError, match=r"bfloat16.*dtype: float32.*bf16: true.*DeepSpeed.*allow_bf16_master_weights"
    ):
        make_trainer(tmp_path, tiny_model("llama", dtype=torch.bfloat16), bf16=True)


@pytest.mark.parametrize("loaded", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_lora_trains_float32_adapters_on_any_base(tmp_path, loaded):
    """peft casts adapters (and the mask token's trainable row) to float32: no opt-in needed for a bf16 base."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tmp_path, tiny_model("llama", dtype=loaded), peft_config=lora, bf16=True)
    trainable = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and set(trainable.values()) == {torch.float32}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {loaded}


def test_deepspeed_bf16_keeps_float32_master_weights_and_is_allowed():
    """Under DeepSpeed with bf16 its optimizer holds float32 master copies: bf16 module weights are fine there, and
    only there (DeepSpeed without mixed precision would update them in place)."""
    from types import SimpleNamespace

    weights = [("w", torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)))]
    plugin = SimpleNamespace(deepspeed_config={"bf16": {"enabled": "auto"}})
    check_master_weights(weights, SimpleNamespace(bf16=True, fp16=False), deepspeed_plugin=plugin)
    explicit = SimpleNamespace(deepspeed_config={"bf16": {"enabled": True}})
    check_master_weights(weights, SimpleNamespace(bf16=False, fp16=False), deepspeed_plugin=explicit)
    with pytest.raises(ValueError, match="allow_bf16_master_weights"):
        check_master_weights(weights, SimpleNamespace(bf16=False, fp16=False), deepspeed_plugin=plugin)
    with pytest.raises(ValueError, match="allow_bf16_master_weights"):
        check_master_weights(weights, SimpleNamespace(bf16=True, fp16=False), deepspeed_plugin=None)
    check_master_weights(weights, SimpleNamespace(bf16=True, allow_bf16_master_weights=True))
    frozen = [("w", torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16), requires_grad=False))]
    check_master_weights(frozen, SimpleNamespace(bf16=True))  # frozen bf16 weights (a teacher, a LoRA base)


X86_WITHOUT_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
X86_WITH_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
ARM_WITH_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16\n"


@pytest.mark.parametrize(
    ("cpuinfo", "fast", "flags"),
    [(X86_WITHOUT_BF16, False, ()), (X86_WITH_AMX, True, ("amx_bf16",)), (ARM_WITH_BF16, True, ("bf16",))],
    ids=["x86-avx512-no-bf16", "x86-amx", "aarch64-bf16"],
)
def test_cpu_bf16_detection_reads_the_cpu_flags(tmp_path, cpuinfo, fast, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    support = precision.cpu_bf16_support(str(path))
    assert (support.fast, support.flags) == (fast, flags)


def test_cpu_bf16_detection_without_cpuinfo_asks_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    support = precision.cpu_bf16_support(str(tmp_path / "missing"))
    assert not support.fast and support.source == "torch.cpu"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_bf16_support(str(tmp_path / "missing")).flags == ("avx512_bf16",)


def _pretend_cpu(monkeypatch, tmp_path, cpuinfo: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    real = precision.cpu_bf16_support
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda cpuinfo_path=str(path): real(cpuinfo_path))


def test_bf16_on_a_cpu_without_bf16_instructions_warns_naming_the_feature(tmp_path, monkeypatch):
    _pretend_cpu(monkeypatch, tmp_path, X86_WITHOUT_BF16)
    with pytest.warns(UserWarning, match=r"without bf16 instructions.*avx512_bf16.*bf16: false"):
        make_trainer(tmp_path, tiny_model("llama"), bf16=True)
    assert precision.bf16_is_fast_here(use_cpu=True) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert not precision.warn_if_cpu_bf16_is_slow(cpu_config(tmp_path, bf16=False))
    _pretend_cpu(monkeypatch, tmp_path, X86_WITH_AMX)
    assert not precision.warn_if_cpu_bf16_is_slow(cpu_config(tmp_path, bf16=True))
    assert precision.bf16_is_fast_here(use_cpu=True) is True
