"""OPDConfig / MDLMConfig (on DiffusionTrainingConfig): choices come from the modules that implement them, sampler
fields fail at config time."""

from dataclasses import fields

import pytest

from opdlm_trl import OPDConfig
from opdlm_trl.baselines import MDLMConfig
from opdlm_trl.config import DiffusionTrainingConfig
from opdlm_trl.curriculum import RAMPS, SCHEDULES
from opdlm_trl.losses import DIVERGENCES, NORMALIZATIONS
from opdlm_trl.sampling import COMMIT_RULES, CONFIDENCE, REMASKING, SamplerConfig
from opdlm_trl.states import SELECTIONS
from opdlm_trl.teachers import TEACHERS
from tests.helpers import cpu_config


def _config(cls=OPDConfig, **overrides):
    return cpu_config("/tmp/opdlm-test-config", cls, **overrides)


def test_entropy_confidence_takes_a_negative_threshold():
    config = _config(confidence="entropy", threshold=-0.5)
    sampler = config.rollout_sampler_config()
    assert (sampler.confidence, sampler.threshold) == ("entropy", -0.5)


def test_entropy_confidence_with_a_probability_threshold_fails_when_the_config_is_made():
    # The default threshold 0.9 is unreachable by a negative entropy: refused now, not at the first rollout.
    with pytest.raises(ValueError, match="NEGATIVE entropy.*threshold <= 0"):
        _config(OPDConfig, confidence="entropy")


def test_the_given_text_config_has_no_rollout_field():
    """MDLMConfig shares DiffusionTrainingConfig with OPDConfig and none of OPD's rollout fields (nothing is decoded
    during training), so a rollout setting on a baseline is refused by name instead of silently ignored."""
    rollout_fields = {f.name for f in fields(OPDConfig)} - {f.name for f in fields(DiffusionTrainingConfig)}
    assert {"threshold", "state_selection", "curriculum_steps", "use_kv_cache"} <= rollout_fields
    assert not rollout_fields & {f.name for f in fields(MDLMConfig)}
    assert issubclass(MDLMConfig, DiffusionTrainingConfig) and issubclass(OPDConfig, DiffusionTrainingConfig)
    with pytest.raises(TypeError, match="threshold"):
        _config(MDLMConfig, threshold=0.5)
    # the shared fields keep their checks on both
    for cls in (OPDConfig, MDLMConfig):
        with pytest.raises(ValueError, match="loss_type='nope' is not one of"):
            _config(cls, loss_type="nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\] for confidence='prob'"),
        ({"steps_per_block": 5}, "steps_per_block=5 exceeds block_size=4"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"remasking": "greedy"}, "remasking must be one of"),
        ({"confidence": "logit"}, "confidence must be one of"),
        ({"commit_order": "random"}, "commit_order=.random. is not a registered commit rule"),
    ],
)
def test_sampler_errors_are_the_samplers_own_at_config_time(overrides, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**{"block_size": 4, **overrides})
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_rollout_sampler_config_maps_the_rollout_fields():
    config = _config(
        block_size=8, max_completion_length=24, remasking="static", steps_per_block=2, temperature=0.7, top_k=5,
        use_kv_cache=False, commit_order="confidence",
    )  # fmt: skip
    sampler = config.rollout_sampler_config(max_new_tokens=16, stop_token_ids=[2])
    assert (sampler.block_size, sampler.max_new_tokens, sampler.steps_per_block) == (8, 16, 2)
    assert (sampler.remasking, sampler.temperature, sampler.top_k) == ("static", 0.7, 5)
    assert sampler.commit_order == "confidence"  # not the default: the field is passed on
    assert sampler.use_cache is False  # from use_kv_cache, not TrainingArguments.use_cache
    assert sampler.stop_token_ids == (2,)


@pytest.mark.parametrize(
    ("name", "choices"),
    [
        ("state_selection", SELECTIONS),
        ("loss_type", DIVERGENCES),
        ("curriculum", SCHEDULES),
        ("threshold_schedule", RAMPS),
        ("loss_normalization", NORMALIZATIONS),
        ("remasking", REMASKING),
        ("commit_order", COMMIT_RULES),
    ],
)
def test_every_choice_of_the_owning_module_is_accepted_and_nothing_else(name, choices):
    for choice in choices:
        assert getattr(_config(**{name: choice}), name) == choice
    with pytest.raises(ValueError, match=name):
        _config(**{name: "not-a-choice"})


def test_confidence_choices_come_from_the_sampler():
    for choice in CONFIDENCE:
        threshold = -0.5 if choice == "entropy" else 0.9
        assert _config(confidence=choice, threshold=threshold).confidence == choice


def test_teacher_backends_are_auto_plus_the_teacher_kinds():
    extra = {"teacher_top_k": 16, "teacher_url": "http://127.0.0.1:1"}
    for backend in ("auto", *TEACHERS):
        assert _config(teacher_backend=backend, **extra).teacher_backend == backend
    with pytest.raises(ValueError, match="teacher_backend"):
        _config(teacher_backend="remote")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"threshold_final": 0.7, "remasking": "static"}, "remasking='dynamic' or drop threshold_final"),
        ({"threshold_final": 1.5}, r"threshold must be in \[0, 1\] for confidence='prob'"),
        ({"threshold_final": 0.7, "threshold_hold_steps": -1}, "threshold_hold_steps must be >= 0"),
        ({"threshold_final": 0.7, "threshold_ramp_steps": 0}, "threshold_ramp_steps >= 1"),
    ],
)
def test_a_threshold_ramp_that_cannot_run_fails_when_the_config_is_made(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_docs_config_page_is_the_generated_field_reference():
    """docs/config.md is `python -m opdlm_trl.config --markdown` verbatim: every OPDConfig field with its help, so the
    reference cannot drift from the code. Run in a fresh interpreter: the help lists the registries as imported, not
    as other tests extended them."""
    import os
    import subprocess
    import sys
    from dataclasses import fields
    from pathlib import Path

    from trl import DistillationConfig

    root = next(folder for folder in Path(__file__).resolve().parents if (folder / "pyproject.toml").exists())
    command = [sys.executable, "-m", "opdlm_trl.config", "--markdown"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    generated = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True, timeout=300)
    committed = (root / "docs" / "config.md").read_text()
    assert committed == generated.stdout, (
        "docs/config.md is stale: python -m opdlm_trl.config --markdown > docs/config.md"
    )
    added = {item.name for item in fields(OPDConfig)} - {item.name for item in fields(DistillationConfig)}
    assert added and all(f"| `{name}` |" in committed for name in added)  # every field the package adds to TRL's
