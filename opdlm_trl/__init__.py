"""opdlm-trl: autoregressive -> diffusion LM conversion by on-policy self-distillation, on TRL."""

from .modeling import DiffusionSettings, diffusion_settings, load_diffusion_model, to_diffusion

__version__ = "0.1.0"

__all__ = ["DiffusionSettings", "diffusion_settings", "load_diffusion_model", "to_diffusion"]
