"""An lm-evaluation-harness model (``"opdlm"``) that answers ``generate_until`` with the diffusion sampler.

Importing this module registers the model name, so either pass an instance to
``lm_eval.simple_evaluate(model=OPDLMEvalModel(...), ...)`` or run the harness CLI through
``python -m opdlm_trl.eval.lm_eval_model --model opdlm --model_args pretrained=DIR,block_size=4 ...``
(the plain ``lm_eval`` command does not know this model: it never imports this module).

Sampler settings are model arguments (``block_size``, ``max_new_tokens``, ``steps_per_block``,
``remasking``, ``commit_order``, ``threshold``, ``confidence``, ``temperature``, ``top_p``, ``top_k``); a task's
``max_gen_toks`` and ``temperature`` / ``do_sample`` override them per request group. The sampler stops
a row at EOS / end-of-turn tokens; the task's ``until`` strings are applied to the decoded text
(everything from the first stop string on is cut), because a block commits several tokens at once and
a string can end in the middle of a block.

Log-likelihood requests are refused: a block-diffusion student has no exact left-to-right likelihood
(its ELBO is a bound that depends on the masking schedule), so multiple-choice tasks scored by
log-likelihood would silently compare numbers of a different kind. Use generative task variants.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..data import parse_chat_template_kwargs, render_chat_texts
from ..masks import round_up_to_block
from ..modeling import diffusion_settings, load_diffusion_model, unwrap_model
from ..sampling import DiffusionSampler, SamplerConfig, default_stop_token_ids

__all__ = ["OPDLMEvalModel", "apply_stop_strings", "main"]

_LOGLIKELIHOOD_REFUSAL = (
    "The opdlm model does not implement {name}: a block-diffusion student has no exact left-to-right "
    "log-likelihood (only a masking-schedule-dependent bound), so log-likelihood-scored tasks "
    "(multiple choice, perplexity) would compare a different quantity than for AR models. Use a generative "
    "variant of the task (output_type: generate_until), e.g. the `*_generative` / chain-of-thought versions."
)


def apply_stop_strings(text: str, until: Sequence[str] | str | None) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (lm-eval's ``until`` semantics)."""
    if not until:
        return text
    stops = [until] if isinstance(until, str) else [stop for stop in until if stop]
    cut = min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=len(text))
    return text[:cut]


def _resolve_device(device: str | None) -> str:
    """The harness CLI passes ``device="cuda"`` by default; fall back to CPU where CUDA is absent."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        fallback = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            warnings.warn(f"device={device!r} is not available here; running on {fallback}.", stacklevel=3)
        return fallback
    return str(device)


def _as_bool(value: bool | str, name: str) -> bool:
    """A model argument given as a bool or, from ``--model_args``, as the strings true/false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return text in ("true", "1")


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


class OPDLMEvalModel(LM):
    """lm-eval ``LM`` running a converted student's diffusion sampler for ``generate_until`` tasks.

    Args:
        pretrained: a converted student directory, or a model object (then pass ``tokenizer``).
        tokenizer: tokenizer object or directory (default: the student's).
        batch_size: prompts decoded together (from the harness CLI use its ``--batch_size`` flag, not
            a model argument: the harness passes it separately).
        device / dtype: where and in which precision a loaded student runs (default: CUDA when
            available, else CPU; an unavailable CUDA device falls back to CPU with a warning).
        max_length: prompt + completion limit; prompts are truncated on the left to fit.
        add_bos_token: prepend the tokenizer's BOS to every context (off by default, like lm-eval's
            ``hf`` model; an empty context always gets one so there is something to condition on).
        block_size, max_new_tokens, steps_per_block, remasking, commit_order, threshold, confidence, temperature,
        top_p, top_k: :class:`opdlm_trl.sampling.SamplerConfig` fields.
        seed: seeds sampling when ``temperature > 0``.
        chat_template_kwargs: chat-template variables used with ``--apply_chat_template`` (a dict or a
            JSON object string, e.g. ``{"enable_thinking": false}``), rendered by
            :func:`opdlm_trl.data.render_chat_texts` like every other prompt of the package.
        enable_thinking: shorthand for ``chat_template_kwargs["enable_thinking"]`` (the name lm-eval's
            ``hf`` model uses); ``False`` is Qwen3's non-thinking mode.
    """

    def __init__(
        self,
        pretrained: str | torch.nn.Module,
        tokenizer=None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        max_length: int | None = None,
        add_bos_token: bool = False,
        block_size: int | None = None,
        max_new_tokens: int = 256,
        steps_per_block: int | None = None,
        remasking: str = "static",
        commit_order: str = "confidence",
        threshold: float = 0.9,
        confidence: str = "prob",
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat_template_kwargs: dict[str, Any] | str | None = None,
        enable_thinking: bool | str | None = None,
    ):
        super().__init__()
        self.chat_template_kwargs = parse_chat_template_kwargs(chat_template_kwargs)
        if enable_thinking not in (None, ""):
            self.chat_template_kwargs["enable_thinking"] = _as_bool(enable_thinking, "enable_thinking")
        if isinstance(pretrained, str):
            model, loaded_tokenizer = load_diffusion_model(pretrained, dtype=_as_dtype(dtype))
            model = model.to(_resolve_device(device))
        else:
            model, loaded_tokenizer = pretrained, None
            diffusion_settings(model)  # clear error for an unconverted model
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer or loaded_tokenizer
        if self.tokenizer is None:
            raise ValueError("Pass `tokenizer=` (object or directory) when `pretrained` is a model object.")
        self.model = model.eval()
        self._device = next(unwrap_model(model).parameters()).device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.add_bos_token = bool(add_bos_token)
        config = unwrap_model(model).config
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", 2048))
        self.sampler_defaults = {
            "block_size": None if block_size in (None, "None", "") else int(block_size),
            "max_new_tokens": int(max_new_tokens),
            "steps_per_block": None if steps_per_block in (None, "None", "") else int(steps_per_block),
            "remasking": str(remasking),
            "commit_order": str(commit_order),
            "threshold": float(threshold),
            "confidence": str(confidence),
            "temperature": float(temperature),
            "top_p": float(top_p),
            "top_k": int(top_k),
            "stop_token_ids": default_stop_token_ids(self.tokenizer, model),
        }
        SamplerConfig(**self.sampler_defaults)  # validate the model arguments now, not at the first request
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    # ---------------------------------------------------------------- chat-template support

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "opdlm")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template is not False else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        (text,) = render_chat_texts(
            [chat_history], self.tokenizer, self.chat_template_kwargs, add_generation_prompt=add_generation_prompt
        )
        return text

    # ---------------------------------------------------------------- requests

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(_LOGLIKELIHOOD_REFUSAL.format(name="loglikelihood"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(_LOGLIKELIHOOD_REFUSAL.format(name="loglikelihood_rolling"))

    def _sampler_config(self, gen_kwargs: dict[str, Any]) -> SamplerConfig:
        """Model-argument defaults overridden by a task's ``max_gen_toks`` / ``temperature`` / ``do_sample``."""
        settings = dict(self.sampler_defaults)
        if "max_gen_toks" in gen_kwargs:
            settings["max_new_tokens"] = int(gen_kwargs["max_gen_toks"])
        if "temperature" in gen_kwargs:
            settings["temperature"] = float(gen_kwargs["temperature"])
        if gen_kwargs.get("do_sample") is False:
            settings["temperature"] = 0.0
        for name in ("top_p", "top_k"):
            if name in gen_kwargs:
                settings[name] = type(settings[name])(gen_kwargs[name])
        block = settings["block_size"] or diffusion_settings(self.model).block_size
        # whole blocks; round here so the sampler does not warn per batch
        settings["max_new_tokens"] = round_up_to_block(settings["max_new_tokens"], block)
        return SamplerConfig(**settings)

    def _encode(self, contexts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Context token ids, left-truncated so prompt + completion fit ``max_length``."""
        encoded = self.tokenizer(list(contexts), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        budget = max(1, self.max_length - max_new_tokens)
        out = []
        for ids in encoded:
            if self.add_bos_token or not ids:
                ids = [bos, *ids]
            out.append(ids[-budget:])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each ``(context, gen_kwargs)`` request; requests sharing ``gen_kwargs`` are batched."""
        from tqdm.auto import tqdm

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="opdlm generate_until")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            config = self._sampler_config(gen_kwargs)
            sampler = DiffusionSampler(config, pad_token_id=self.tokenizer.pad_token_id)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                contexts = [requests[i].args[0] for i in chunk]
                prompts = self._encode(contexts, config.max_new_tokens)
                texts = sampler.sample(self.model, prompts, generator=self.generator).texts(self.tokenizer)
                for i, context, text in zip(chunk, contexts, texts, strict=True):
                    results[i] = apply_stop_strings(text, gen_kwargs.get("until"))
                    self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), results[i])
                progress.update(len(chunk))
        progress.close()
        return results


def main() -> None:
    """The lm-eval CLI with the ``opdlm`` model registered (``python -m opdlm_trl.eval.lm_eval_model run ...``)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    # Register the class of the importable module, not this ``__main__`` copy: lm-eval refuses a second,
    # different class under the same name if anything imports the module normally.
    from opdlm_trl.eval.lm_eval_model import main as _main

    _main()
else:
    register_model("opdlm")(OPDLMEvalModel)
