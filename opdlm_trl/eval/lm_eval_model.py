"""An lm-evaluation-harness model (``"opdlm"``): the diffusion sampler for ``generate_until``, the exact
fixed-order log-likelihood for ``loglikelihood`` / ``loglikelihood_rolling``.

Importing this module registers the model name, so either pass an instance to
``lm_eval.simple_evaluate(model=OPDLMEvalModel(...), ...)`` or run the harness CLI through
``python -m opdlm_trl.eval.lm_eval_model run --model opdlm --model_args pretrained=DIR,block_size=4 ...``
(the plain ``lm_eval`` command does not know this model: it never imports this module). Data-parallel, like
lm-eval's ``hf`` model: ``accelerate launch -m opdlm_trl.eval.lm_eval_model run --model opdlm ...`` gives every
process its share of the documents (the harness shards them by ``rank`` / ``world_size``) and gathers the results.

Sampler settings are model arguments (``block_size``, ``max_new_tokens``, ``steps_per_block``,
``remasking``, ``commit_order``, ``threshold``, ``confidence``, ``temperature``, ``top_p``, ``top_k``); a task's
``max_gen_toks`` and ``temperature`` / ``do_sample`` override them per request group. The sampler stops
a row at EOS / end-of-turn tokens; the task's ``until`` strings are applied to the decoded text
(everything from the first stop string on is cut), because a block commits several tokens at once and
a string can end in the middle of a block.

Log-likelihood requests (multiple choice, perplexity) are scored by :mod:`opdlm_trl.likelihood`: the exact
probability that left-to-right decoding, one token per step, writes the continuation (``likelihood=exact``, the
default; a number of the same kind as an AR model's), or dLLM's Monte Carlo ELBO (``likelihood=elbo``,
``mc_num`` samples). Contexts and continuations are tokenised exactly as lm-eval's ``hf`` model does, and
``loglikelihood_rolling`` cuts long texts into the same disjoint windows, so the numbers compare with the
teacher's side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..data import parse_chat_template_kwargs, render_chat_texts
from ..likelihood import LIKELIHOODS, elbo_loglikelihood, loglikelihood
from ..masks import round_up_to_block
from ..modeling import diffusion_settings, load_diffusion_model, unwrap_model
from ..sampling import DiffusionSampler, SamplerConfig, default_stop_token_ids
from .placement import resolve_device, resolve_dtype

__all__ = ["OPDLMEvalModel", "apply_stop_strings", "main"]


def apply_stop_strings(text: str, until: Sequence[str] | str | None) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (lm-eval's ``until`` semantics)."""
    if not until:
        return text
    stops = [until] if isinstance(until, str) else [stop for stop in until if stop]
    cut = min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=len(text))
    return text[:cut]


def _as_bool(value: bool | str, name: str) -> bool:
    """A model argument given as a bool or, from ``--model_args``, as the strings true/false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return text in ("true", "1")


def _launched_accelerator(device: torch.device):
    """An ``Accelerator`` when started by ``accelerate launch`` with several processes, else ``None``.

    CPU processes (tests, CPU nodes) communicate over gloo: ``cpu=True`` keeps accelerate from picking a GPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu")


class OPDLMEvalModel(TemplateLM):
    """lm-eval ``LM`` of a converted student: diffusion sampling and exact fixed-order log-likelihoods.

    Args:
        pretrained: a converted student directory, or a model object (then pass ``tokenizer``).
        tokenizer: tokenizer object or directory (default: the student's).
        batch_size: prompts decoded together (from the harness CLI use its ``--batch_size`` flag, not
            a model argument: the harness passes it separately).
        device / dtype: where and in which precision a loaded student runs (:mod:`opdlm_trl.eval.placement`:
            default CUDA when available, else CPU; ``dtype="auto"`` = bfloat16 on CUDA, float32 on CPU). Under
            ``accelerate launch`` with several processes each process takes its own device and share.
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
        likelihood: how log-likelihood requests are scored, ``"exact"`` (fixed left-to-right order) or
            ``"elbo"`` (Monte Carlo, ``mc_num`` samples, seeded by ``seed``); :data:`opdlm_trl.likelihood.LIKELIHOODS`.
    """

    def __init__(
        self,
        pretrained: str | torch.nn.Module,
        tokenizer=None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        max_length: int | None = None,
        add_bos_token: bool = False,
        block_size: int | None = None,
        max_new_tokens: int = 256,
        steps_per_block: int | None = None,
        remasking: str = "static",
        commit_order: str = SamplerConfig.commit_order,
        threshold: float = 0.9,
        confidence: str = "prob",
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat_template_kwargs: dict[str, Any] | str | None = None,
        enable_thinking: bool | str | None = None,
        likelihood: str = "exact",
        mc_num: int = 128,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        self.likelihood, self.mc_num = likelihood, int(mc_num)
        self.accelerator = None
        self.chat_template_kwargs = parse_chat_template_kwargs(chat_template_kwargs)
        if enable_thinking not in (None, ""):
            self.chat_template_kwargs["enable_thinking"] = _as_bool(enable_thinking, "enable_thinking")
        if isinstance(pretrained, str):
            place = resolve_device(device)
            self.accelerator = _launched_accelerator(place)
            if self.accelerator is not None:
                place = self.accelerator.device
                self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            model, loaded_tokenizer = load_diffusion_model(pretrained, dtype=resolve_dtype(dtype, place))
            model = model.to(place)
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
        self.seed = int(seed)

    # ---------------------------------------------------------------- data parallel (as lm-eval's hf model)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

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

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context / the first rolling window conditions on: BOS, else EOS (as lm-eval's hf model)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; special tokens only with ``add_bos_token`` (or when asked explicitly)."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=add)

    def _score(self, pairs: list[tuple[list[int], list[int]]], progress) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of token pairs by the chosen ``likelihood`` (ELBO: never greedy)."""
        block_size = self.sampler_defaults["block_size"]
        if self.likelihood == "elbo":
            generator = torch.Generator().manual_seed(self.seed)
            values = elbo_loglikelihood(
                self.model, pairs, self.tokenizer.pad_token_id, self.mc_num, self.batch_size, block_size,
                self.max_length, generator,
            )  # fmt: skip
            progress(len(pairs))
            return [(value, False) for value in values]
        return loglikelihood(
            self.model, pairs, self.tokenizer.pad_token_id, self.batch_size, block_size, self.max_length, progress
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's hook: ``((context, continuation), context_ids, continuation_ids)`` requests."""
        from tqdm.auto import tqdm

        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="opdlm loglikelihood")
        results = self._score([(list(r[1]), list(r[2])) for r in requests], progress.update)
        progress.close()
        for request, result in zip(requests, results, strict=True):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Disjoint ``(context, continuation)`` windows covering ``text``: lm-eval's rule for its hf model."""
        windows = lm_eval_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text),
            prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length,
            context_len=1,
        )
        return [lm_eval_utils.make_disjoint_window(window) for window in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity): the sum over their windows, all windows batched together."""
        from tqdm.auto import tqdm

        windows = [self.rolling_windows(request.args[0]) for request in requests]
        flat = [window for request_windows in windows for window in request_windows]
        progress = tqdm(total=len(flat), disable=disable_tqdm or self.rank != 0, desc="opdlm loglikelihood_rolling")
        scores = iter(self._score(flat, progress.update))
        progress.close()
        totals = []
        for request, request_windows in zip(requests, windows, strict=True):
            total = sum(next(scores)[0] for _ in request_windows)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

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
