"""The TRL / transformers surface opdlm_trl depends on (opdlm_trl/_trl.py): a TRL upgrade that moves it fails here.

Each assertion names what moved, so the fix starts in ``opdlm_trl/_trl.py`` rather than inside a training step.

The declared lists cannot drift from the code: the private names the package's trainers override (members of
``OPDTrainer`` / the baselines that shadow a base-class member) and the ``self._x`` attributes they read that the
base classes set are derived from the trainers' own classes and source, and each must be declared in ``_trl.py``;
every declared one must still be defined by the base class named there. The tests that rename one in the installed
TRL / transformers (``monkeypatch``) check that the check itself names it.
"""

import ast
import inspect
import textwrap

import pytest
import torch

import opdlm_trl.baselines  # noqa: F401  (defines the baseline trainers the contract covers)
from opdlm_trl import _trl


# ------------------------------------------------------------------------------------- derived from the code
def base_classes() -> list[type]:
    """TRL's and transformers' trainer classes our trainers inherit from, nearest first."""
    return [cls for cls in _trl.DistillationTrainer.__mro__ if cls is not object]


def base_class(name: str) -> type:
    return next(cls for cls in base_classes() if cls.__name__ == name)


def package_classes() -> list[type]:
    """Every class of opdlm_trl in the MRO of a package trainer (trainers and their mixins)."""

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    found = {}
    for trainer in subclasses(_trl.DistillationTrainer):
        if trainer.__module__.startswith("opdlm_trl."):
            found.update({cls: None for cls in trainer.__mro__ if cls.__module__.startswith("opdlm_trl.")})
    return list(found)


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def overridden_base_members() -> dict[str, type]:
    """Private members of the package's trainers that shadow a base-class member: name -> the defining base."""
    overrides = {}
    for cls in package_classes():
        for name in vars(cls):
            owner = next((base for base in base_classes() if name in vars(base)), None)
            if is_private(name) and owner is not None:
                overrides[name] = owner
    return overrides


def self_attributes() -> tuple[set[str], set[str]]:
    """``(read, assigned)``: the private ``self._x`` names in the package trainers' source."""
    read, assigned = set(), set()
    for cls in package_classes():
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls)))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if is_private(node.attr):
                    (assigned if isinstance(node.ctx, ast.Store) else read).add(node.attr)
    return read, assigned


def base_source() -> str:
    return "".join(inspect.getsource(cls) for cls in base_classes())


def attributes_read_from_the_bases(source: str) -> set[str]:
    """``self._x`` the package reads and does not own: never assigned by it, or also assigned by a base class."""
    read, assigned = self_attributes()
    members = {name for cls in package_classes() for name in vars(cls)}
    return {name for name in read - members if name not in assigned or f"self.{name} =" in source}


# ------------------------------------------------------------------------------------- the checks
def hook_problems() -> list[str]:
    """What is wrong between the package's overrides, ``_trl.HOOKS`` / ``CLASS_ATTRIBUTES`` and the base classes."""
    problems = []
    declared = {**{name: owner for name, (owner, _) in _trl.HOOKS.items()}, **_trl.CLASS_ATTRIBUTES}
    for name, owner in overridden_base_members().items():
        if name not in declared:
            problems.append(
                f"`{name}` overrides {owner.__name__}.{name} but is not declared in opdlm_trl/_trl.py "
                "(HOOKS for a method, CLASS_ATTRIBUTES otherwise)."
            )
    for name, owner_name in declared.items():
        owner = base_class(owner_name)
        if name not in vars(owner):
            now = next((base.__name__ for base in base_classes() if name in vars(base)), None)
            where = f"only {now} defines it now" if now else "no base class defines it any more"
            problems.append(f"{owner_name}.{name} is gone ({where}); opdlm_trl overrides it (opdlm_trl/_trl.py).")
    for name, (owner_name, parameters) in _trl.HOOKS.items():
        hook = vars(base_class(owner_name)).get(name)
        found = None if hook is None else tuple(inspect.signature(hook).parameters)
        if found is not None and found != parameters:
            problems.append(f"{owner_name}.{name}{found} changed; opdlm_trl expects {parameters} (opdlm_trl/_trl.py).")
    return problems


def attribute_problems(source: str) -> list[str]:
    """What is wrong between the ``self._x`` the package reads, ``_trl.TRAINER_ATTRIBUTES`` and the bases' source."""
    problems = [
        f"opdlm_trl reads `self.{name}`, which it never sets itself: declare it in opdlm_trl/_trl.py "
        "TRAINER_ATTRIBUTES if a TRL / transformers class sets it (else it is a typo or was renamed there)."
        for name in sorted(attributes_read_from_the_bases(source) - set(_trl.TRAINER_ATTRIBUTES))
    ]
    problems += [
        f"TRL/transformers no longer set `{name}` ({assignment!r}); opdlm_trl uses it (opdlm_trl/_trl.py)."
        for name, assignment in _trl.TRAINER_ATTRIBUTES.items()
        if assignment not in source
    ]
    return problems


def test_every_base_member_the_trainers_override_is_declared_and_still_defined_there():
    problems = hook_problems()
    assert not problems, "\n".join(problems)


def test_every_base_attribute_the_trainers_read_is_declared_and_still_set_there():
    problems = attribute_problems(base_source())
    assert not problems, "\n".join(problems)


def test_the_derivation_finds_what_the_trainers_are_known_to_override_and_read():
    # Guards the derivation itself: an AST walk that found nothing would make both checks above vacuous.
    assert {"_generate_and_score_completions", "_get_train_sampler", "_load_callback_state", "_tag_names"} <= set(
        overridden_base_members()
    )
    assert {"_metrics", "_logs", "_tokenizer"} <= attributes_read_from_the_bases(base_source())
    assert "_progress" not in attributes_read_from_the_bases(base_source())  # the package's own state


@pytest.mark.parametrize("name", [*_trl.HOOKS, *_trl.CLASS_ATTRIBUTES])
def test_a_base_member_renamed_in_trl_is_reported_by_name(monkeypatch, name):
    owner_name = _trl.HOOKS[name][0] if name in _trl.HOOKS else _trl.CLASS_ATTRIBUTES[name]
    monkeypatch.delattr(base_class(owner_name), name)  # as if the installed TRL / transformers renamed it
    assert any(f".{name} is gone" in problem for problem in hook_problems()), hook_problems()


@pytest.mark.parametrize("name", list(_trl.TRAINER_ATTRIBUTES))
def test_a_base_attribute_renamed_in_trl_is_reported_by_name(name):
    assignment = _trl.TRAINER_ATTRIBUTES[name]
    renamed = base_source().replace(assignment, assignment.replace(name, f"{name}_renamed"))
    assert any(f"`{name}`" in problem for problem in attribute_problems(renamed))


def test_an_undeclared_override_and_an_undeclared_read_are_reported_by_name(monkeypatch):
    monkeypatch.delitem(_trl.HOOKS, "_get_train_sampler")
    assert any("`_get_train_sampler` overrides DistillationTrainer" in problem for problem in hook_problems())
    monkeypatch.delitem(_trl.TRAINER_ATTRIBUTES, "_metrics")
    assert any("`self._metrics`" in problem for problem in attribute_problems(base_source()))


def test_loss_is_scaled_for_gradient_accumulation_by_the_trainer():
    # OPDTrainer.compute_loss divides by the generation batch's count: transformers must not divide again.
    assert _trl.DistillationTrainer.loss_is_scaled_for_ga is True, (
        "DistillationTrainer.loss_is_scaled_for_ga is no longer True: transformers would divide OPD's loss by "
        "gradient_accumulation_steps a second time (opdlm_trl/_trl.py TRAINER_ATTRIBUTES)."
    )


def test_create_model_from_path_takes_an_architecture_and_from_pretrained_kwargs():
    # opdlm_trl.trainer.load_pretrained passes AutoModelForCausalLM and from_pretrained keyword arguments.
    parameters = inspect.signature(_trl.create_model_from_path).parameters
    assert list(parameters)[:2] == ["model_id", "architecture"] and "kwargs" in parameters, (
        f"trl's create_model_from_path{tuple(parameters)} changed; opdlm_trl.trainer.load_pretrained calls "
        "create_model_from_path(path, AutoModelForCausalLM, **init_kwargs)."
    )


def test_prepare_inputs_shuffles_and_splits_the_generation_hooks_batch():
    source = inspect.getsource(_trl.DistillationTrainer._prepare_inputs)
    for name in ("_generate_and_score_completions", "shuffle_sequence_dict", "split_tensor_dict"):
        assert name in source, f"DistillationTrainer._prepare_inputs no longer calls {name}: re-check BATCH_CONTRACT."


def _generation_batch(rows: int = 6) -> dict:
    """A dict shaped like OPDTrainer's generation hook output: per-row tensors, a 0-d normaliser, absent targets."""
    return {
        "prompt_ids": torch.arange(rows * 4).view(rows, 4),
        "loss_mask": torch.arange(rows * 8).view(rows, 8) % 2 == 0,
        "teacher_full_logprobs": torch.randn(rows, 8, 5),
        "teacher_top_ids": None,
        "normaliser": torch.tensor(17),
    }


def test_split_tensor_dict_keeps_rows_in_order_copies_scalars_and_keeps_none():
    batch = _generation_batch()
    chunks = _trl.split_tensor_dict(batch, 3)
    assert len(chunks) == 3
    for index, chunk in enumerate(chunks):
        assert torch.equal(chunk["prompt_ids"], batch["prompt_ids"][2 * index : 2 * index + 2])
        assert torch.equal(chunk["teacher_full_logprobs"], batch["teacher_full_logprobs"][2 * index : 2 * index + 2])
        assert chunk["teacher_top_ids"] is None
        assert chunk["normaliser"].ndim == 0 and int(chunk["normaliser"]) == 17


def test_shuffle_sequence_dict_permutes_rows_in_unison_and_keeps_scalars():
    batch = _generation_batch()
    torch.manual_seed(0)
    shuffled = _trl.shuffle_sequence_dict(batch)
    order = shuffled["prompt_ids"][:, 0] // 4  # row r of prompt_ids starts with 4 r
    assert sorted(order.tolist()) == list(range(6))
    assert torch.equal(shuffled["loss_mask"], batch["loss_mask"][order])
    assert torch.equal(shuffled["teacher_full_logprobs"], batch["teacher_full_logprobs"][order])
    assert shuffled["teacher_top_ids"] is None and int(shuffled["normaliser"]) == 17


def test_generation_and_deepspeed_helpers_take_the_arguments_we_pass():
    unwrap = inspect.signature(_trl.unwrap_model_for_generation).parameters
    for name in ("gather_deepspeed3_params", "gradient_checkpointing_kwargs"):
        assert name in unwrap, f"trl's unwrap_model_for_generation lost `{name}` (used by OPDTrainer.rollout)."
    assert tuple(inspect.signature(_trl.prepare_deepspeed).parameters)[:2] == ("model", "accelerator")
    sampler = inspect.signature(_trl.RepeatSampler.__init__).parameters
    for name in ("data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"):
        assert name in sampler, f"trl's RepeatSampler lost `{name}` (subclassed by opdlm_trl.checkpoints)."
