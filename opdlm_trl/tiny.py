"""Tiny local models and a locally trained tokenizer, for tests, smoke benchmarks and docs.

Nothing here touches the Hugging Face hub: the tokenizer is trained in a second on text this module
carries, and the models are built from configs with random weights. Four families cover the
architectures the project promises (Llama, Qwen2, Qwen3, Mistral); Qwen-style configs get a few
unused embedding rows so the "free row" mask-token policy is exercised too.
"""

from __future__ import annotations

import os
import tempfile

import torch

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "QWEN3_ARCHITECTURES",
    "parameter_count",
    "qwen3_config",
    "smollm2_shaped_model",
    "tiny_model",
    "tiny_tokenizer",
]

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """
def add(a, b):
    return a + b

def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

The quick brown fox jumps over the lazy dog. A diffusion language model writes several tokens at
once by unmasking the most confident positions of a block, while an autoregressive model writes one
token after another. Questions and answers: what is two plus two? Two plus two is four.
for i in range(10):
    print(i * i)
class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
"""

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_TOKENIZER_CACHE: dict[str, str] = {}


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained locally, with EOS/pad/chat tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    key = str(vocab_size)
    if key not in _TOKENIZER_CACHE:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            eos_token="<|im_end|>",
            pad_token="<|pad|>",
            bos_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        )
        fast.chat_template = CHAT_TEMPLATE
        directory = tempfile.mkdtemp(prefix="opdlm_tiny_tok_")
        fast.save_pretrained(directory)
        _TOKENIZER_CACHE[key] = directory
    return AutoTokenizer.from_pretrained(_TOKENIZER_CACHE[key])


def tiny_model(
    architecture: str = "llama",
    vocab_size: int | None = None,
    attn_implementation: str = "sdpa",
    hidden_size: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
    free_rows: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised causal LM of the given family (float32, eval mode).

    ``vocab_size`` defaults to the tiny tokenizer's length plus ``free_rows`` unused rows (8 for the
    Qwen families, 0 otherwise), mirroring Qwen's padded embedding matrices.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose from {ARCHITECTURES}.")
    if vocab_size is None:
        free = free_rows if free_rows is not None else (8 if architecture.startswith("qwen") else 0)
        vocab_size = len(tiny_tokenizer()) + free
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=architecture in ("qwen2", "qwen3"),
    )
    if architecture == "qwen3":
        common["head_dim"] = hidden_size // num_heads
    if architecture == "mistral":
        common["sliding_window"] = None
    config = AutoConfig.for_model(architecture, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def smollm2_shaped_model(seed: int = 0, max_position_embeddings: int = 8192):
    """A random Llama with SmolLM2-135M's shape (30 layers, hidden 576, vocab 49,152; 134.5M parameters).

    For speed and memory benchmarks: the cost of a forward depends on the shape, not on the weights,
    and the shape needs no hub access.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


# The published Qwen3 architectures (each checkpoint's config.json), by hub name: what the shipped GPU recipes
# convert. Benchmarks build random models of these widths (the real vocabulary, a reduced depth) to reproduce
# GPU-scale memory on a CPU, and the memory model sizes its predictions by them; a shape needs no hub access.
QWEN3_ARCHITECTURES = {
    "Qwen/Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "Qwen/Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "Qwen/Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "Qwen/Qwen3-8B": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
}
_QWEN3_COMMON = dict(
    vocab_size=151_936,  # embedding rows of every Qwen3 checkpoint (the tokenizer has 151,669 tokens)
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40_960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=151_643,
    eos_token_id=151_645,
)


def qwen3_config(name: str = "Qwen/Qwen3-0.6B", **overrides):
    """The published ``Qwen3Config`` of ``name``, with ``overrides`` (fewer layers, a narrower width for a smoke run)."""
    from transformers import Qwen3Config

    if name not in QWEN3_ARCHITECTURES:
        raise ValueError(f"Unknown Qwen3 architecture {name!r}; choose from {sorted(QWEN3_ARCHITECTURES)}.")
    return Qwen3Config(**{**_QWEN3_COMMON, **QWEN3_ARCHITECTURES[name], **overrides})


def parameter_count(config) -> int:
    """Parameters of the causal LM ``config`` describes (tied embeddings once), counted on the meta device: no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def save_tiny_pair(directory: str | os.PathLike, architecture: str = "llama", **kwargs) -> str:
    """Save a tiny model + tokenizer to ``directory`` (a stand-in for a hub checkpoint)."""
    model = tiny_model(architecture, **kwargs)
    tokenizer = tiny_tokenizer()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
