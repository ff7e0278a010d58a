"""opdlm-trl: autoregressive -> diffusion LM conversion by on-policy self-distillation, on TRL.

The layout follows the method: conversion (:mod:`.modeling`, :mod:`.masks`) -> sampling (:mod:`.sampling`) ->
teachers (:mod:`.teachers`) -> training states and losses (:mod:`.states`, :mod:`.losses`, :mod:`.curriculum`)
-> trainers and configs (:mod:`.diffusion_trainer`, :mod:`.trainer`, :mod:`.config`, :mod:`.baselines`). The
trainer-side names import TRL, so they are loaded lazily: ``import opdlm_trl`` stays light for inference.
"""

from importlib import import_module

from .modeling import DiffusionSettings, diffusion_settings, load_diffusion_model, to_diffusion
from .sampling import DiffusionSampler, Rollout, SamplerConfig, generate

__version__ = "0.1.0"

_LAZY = {
    "DiffusionTrainingConfig": ".config",
    "DiffusionTrainer": ".diffusion_trainer",
    "OPDConfig": ".config",
    "OPDTrainer": ".trainer",
    "MDLMConfig": ".baselines",
    "MDLMTrainer": ".baselines",
    "OffPolicyKDTrainer": ".baselines",
}

__all__ = [
    "DiffusionSampler",
    "DiffusionSettings",
    "Rollout",
    "SamplerConfig",
    "diffusion_settings",
    "generate",
    "load_diffusion_model",
    "to_diffusion",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
