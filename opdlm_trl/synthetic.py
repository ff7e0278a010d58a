"""A synthetic language a tiny teacher learns in seconds, for end-to-end checks that OPD yields parallel decoding.

On a real teacher, whether a student *could* decode several tokens per forward is unknown until measured (the oracle
ceiling of :mod:`opdlm_trl.diagnostics`). Here it is designed in: the language mixes tokens that are
deterministic functions of what came before (a counter, fixed phrases, copies of the prompt) with genuinely random
choices, so a teacher trained on it is near-certain in most places and unsure in a known few. OPD must then teach
the student to commit the certain stretches together; a broken training signal cannot.

The language (:class:`PhraseChain`). A prompt is ``<s> kA kB rX``: two key words and a first choice. The completion
is a chain of *units*; unit ``u`` after the previous choice ``r`` is

    c{u mod M}  phrase(r)  r'

a counter token, a fixed phrase selected by the previous choice, then a new choice ``r'`` drawn at random:
``(r + 1) mod K`` with probability ``p_top``, any other choice uniformly otherwise. Even choices select a 2-word
phrase, odd ones a 4-word phrase followed by a copy of the prompt's keys, so units are 4 or 8 tokens long. The
completion starts on a block boundary (the sampler pads prompts to whole blocks) and every unit is a whole number of
block-4 blocks, so each random choice sits at the last offset of a block: a block-4 student that commits every
deterministic token can finish a short unit in 2 steps and a long one in 3: 12 tokens in 5 steps on the teacher's
greedy text, which alternates short and long units (its chain-bound ceiling at threshold 0.9 on 32-token
completions measures 2.46 tokens per forward, the cut last unit included).

:func:`train_teacher` fits a tiny Llama (:func:`opdlm_trl.tiny.tiny_model`) to the language by plain next-token
cross-entropy on CPU; :func:`phrase_chain_tokenizer` is its word-level tokenizer (with a ``<mask>`` token for the
student). :data:`RECIPE` / :func:`opd_config` are the conversion settings and :func:`evaluate_student` the
measurement shared by ``tests/unit/test_synthetic_opd.py`` and ``benchmarks/synthetic_curve.py``.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field

import torch

__all__ = [
    "RECIPE",
    "PhraseChain",
    "evaluate_student",
    "opd_config",
    "phrase_chain_tokenizer",
    "prompt_dataset",
    "train_teacher",
]

SPECIAL_TOKENS = ("<pad>", "<s>", "<eos>", "<mask>")  # ids 0..3, in this order
_TOKENIZER_CACHE: dict[tuple, str] = {}


@dataclass(frozen=True)
class PhraseChain:
    """The language's parameters and its sampler (see the module docstring for the grammar).

    Attributes:
        choices: K, the number of choice tokens ``r0..r{K-1}``.
        counter: M, the counter's modulus (tokens ``c0..c{M-1}``).
        words: the number of phrase/key words ``w0..``.
        p_top: probability of the preferred next choice ``(r + 1) mod K``; below the decoding threshold on
            purpose, so a choice is a position no student should commit before it is the only one left.
        seed: fixes the phrase table (which words each choice's phrase uses).
    """

    choices: int = 4
    counter: int = 8
    words: int = 12
    p_top: float = 0.7
    seed: int = 0
    phrases: tuple[tuple[str, ...], ...] = field(init=False, repr=False)

    def __post_init__(self):
        if self.choices < 2 or self.counter < 2 or self.words < 4:
            raise ValueError("PhraseChain needs choices >= 2, counter >= 2 and words >= 4.")
        if not 1.0 / self.choices < self.p_top < 1.0:
            raise ValueError(f"p_top must be in (1/choices, 1) so the preferred choice is the mode, got {self.p_top}.")
        table = random.Random(self.seed)
        phrases = tuple(
            tuple(table.sample(self.word_tokens, 2 if choice % 2 == 0 else 4)) for choice in range(self.choices)
        )
        object.__setattr__(self, "phrases", phrases)

    # -------------------------------------------------------------------------------------------- vocabulary
    @property
    def word_tokens(self) -> list[str]:
        return [f"w{i}" for i in range(self.words)]

    @property
    def vocabulary(self) -> list[str]:
        """Every token, specials first (ids 0..3: pad, bos, eos, mask)."""
        counters = [f"c{i}" for i in range(self.counter)]
        choices = [f"r{i}" for i in range(self.choices)]
        return [*SPECIAL_TOKENS, *counters, *choices, *self.word_tokens]

    # -------------------------------------------------------------------------------------------- sampling
    def prompt(self, rng: random.Random) -> list[str]:
        """``<s> kA kB rX``: two key words and the first choice (4 tokens: one block)."""
        return ["<s>", *rng.sample(self.word_tokens, 2), f"r{rng.randrange(self.choices)}"]

    def prompts(self, count: int, seed: int) -> list[str]:
        """``count`` prompt strings (the OPD trainer's ``prompt`` column), reproducible from ``seed``."""
        rng = random.Random(seed)
        return [" ".join(self.prompt(rng)) for _ in range(count)]

    def unit(self, index: int, previous: int, keys: list[str], rng: random.Random | None) -> list[str]:
        """Unit ``index`` after choice ``previous``; ``rng=None`` takes the preferred choice (the language's mode)."""
        body = [f"c{index % self.counter}", *self.phrases[previous]]
        if previous % 2 == 1:
            body += keys
        return [*body, f"r{self._next_choice(previous, rng)}"]

    def _next_choice(self, previous: int, rng: random.Random | None) -> int:
        preferred = (previous + 1) % self.choices
        if rng is None or rng.random() < self.p_top:
            return preferred
        return rng.choice([c for c in range(self.choices) if c != preferred])

    def completion(self, prompt: list[str], length: int, rng: random.Random | None) -> list[str]:
        """The first ``length`` completion tokens after ``prompt`` (``rng=None``: the most likely completion)."""
        keys, previous = prompt[1:3], int(prompt[3][1:])
        tokens: list[str] = []
        index = 0
        while len(tokens) < length:
            tokens += self.unit(index, previous, keys, rng)
            previous, index = int(tokens[-1][1:]), index + 1
        return tokens[:length]

    def sequences(self, count: int, length: int, seed: int) -> list[list[str]]:
        """``count`` sampled prompt + completion token lists with ``length`` completion tokens each."""
        rng = random.Random(seed)
        out = []
        for _ in range(count):
            prompt = self.prompt(rng)
            out.append(prompt + self.completion(prompt, length, rng))
        return out


# ------------------------------------------------------------------------------------------------ tokenizer


def phrase_chain_tokenizer(language: PhraseChain | None = None):
    """A word-level tokenizer of the language (whitespace-split), with pad/bos/eos/mask tokens at ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    language = language or PhraseChain()
    vocabulary = language.vocabulary
    key = tuple(vocabulary)
    if key not in _TOKENIZER_CACHE:
        tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocabulary)}, unk_token="<pad>"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="<eos>", mask_token="<mask>"
        )
        directory = tempfile.mkdtemp(prefix="opdlm_phrase_chain_tok_")
        fast.save_pretrained(directory)
        _TOKENIZER_CACHE[key] = directory
    return AutoTokenizer.from_pretrained(_TOKENIZER_CACHE[key])


# ------------------------------------------------------------------------------------------------ teacher


def train_teacher(
    language: PhraseChain | None = None,
    tokenizer=None,
    steps: int = 300,
    batch_size: int = 64,
    completion_length: int = 40,
    learning_rate: float = 3e-3,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
):
    """A tiny Llama trained from scratch on sampled text of ``language`` (next-token cross-entropy, AdamW, CPU).

    The model's bos/eos/pad ids are the tokenizer's, so ``generate`` and the package's stop rule agree with it.
    Returns the model in eval mode (float32). ``completion_length`` should cover the longest completion it will
    be asked for: positions it never saw are not learned.
    """
    from .tiny import tiny_model

    language = language or PhraseChain()
    tokenizer = tokenizer or phrase_chain_tokenizer(language)
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    generator_seed = seed * 100_003
    model.train()
    for step in range(steps):
        texts = language.sequences(batch_size, completion_length, seed=generator_seed + step)
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(tokens) for tokens in texts])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


# ------------------------------------------------------------------------------------------------ conversion

# The conversion recipe of the end-to-end test and benchmark: a full fine-tune in float32 on CPU, block 4, the
# paper's dynamic rollouts at 0.9, a constant learning rate far above the paper's 1e-5 (a 70k-parameter model
# trained from scratch moves slowly at 1e-5), and 32-token rollouts (8 blocks: the length the teacher is evaluated on).
RECIPE = dict(
    block_size=4,
    learning_rate=2e-3,
    lr_scheduler_type="constant",
    warmup_steps=0,
    per_device_train_batch_size=32,
    max_completion_length=32,
    temperature=1.0,
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)
EVAL_THRESHOLD = 0.9


def opd_config(output_dir: str, **overrides):
    """:class:`opdlm_trl.OPDConfig` of the synthetic conversion (:data:`RECIPE`); ``overrides`` win."""
    from .config import OPDConfig

    return OPDConfig(output_dir=str(output_dir), **{**RECIPE, **overrides})


def prompt_dataset(language: PhraseChain, count: int, seed: int):
    """A ``datasets.Dataset`` with a plain-text ``prompt`` column of ``count`` prompts of ``language``."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": prompt} for prompt in language.prompts(count, seed)])


def evaluate_student(
    student,
    teacher,
    tokenizer,
    prompts,
    max_new_tokens: int = 32,
    threshold: float = EVAL_THRESHOLD,
    commit_order: str | None = None,
):
    """What the end-to-end check asserts, from one :func:`opdlm_trl.eval.evaluate_model` run.

    Returns ``tokens_per_forward`` (dynamic greedy decoding at ``threshold`` with ``commit_order``, default the
    sampler's, so the end-to-end check converts and decodes the way a user does by default), ``ceiling``
    (the chain-bound oracle on the teacher's greedy text at the same threshold and the student's block size),
    teacher NLL per token of the student's static and dynamic greedy output beside the teacher's own greedy text
    (``static_nll``, ``dynamic_nll``, ``teacher_nll``) and the dynamic decoding's ``out_of_order_rate``.
    """
    from .eval import evaluate_model
    from .eval.report import student_system
    from .modeling import diffusion_settings
    from .sampling import SamplerConfig

    commit_order = commit_order or SamplerConfig.commit_order

    report = evaluate_model(
        student,
        teacher=teacher,
        tokenizer=tokenizer,
        dataset=prompts,
        max_new_tokens=max_new_tokens,
        threshold=threshold,
        batch_size=len(prompts),
        keep_samples=False,
        commit_orders=(commit_order,),
    )
    results = report["results"]
    static, dynamic = (results[student_system(decoding, commit_order)] for decoding in ("static", "dynamic"))
    block = str(diffusion_settings(student).block_size)
    return {
        "tokens_per_forward": dynamic["tokens_per_forward"],
        "ceiling": report["oracle_ceiling"]["by_block"][block][f"{threshold:g}"],
        "static_nll": static["teacher_nll_per_token"],
        "dynamic_nll": dynamic["teacher_nll_per_token"],
        "teacher_nll": results["teacher_ar"]["teacher_nll_per_token"],
        "out_of_order_rate": dynamic["out_of_order_rate"],
    }
