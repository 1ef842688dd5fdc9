"""Tiny seeded random-weight LMs with a locally trained BPE tokenizer, for tests and the demo.

Built offline in about a second and saved with `save_pretrained`, so they load
through the same `from_pretrained` path as a user's real model. Weights are scaled
up from the default init (embeddings std 1, matrices std 1/sqrt(fan_in)) so that the
greedy output depends on the input: at default init a tiny model tends to emit the
same tokens whatever it is given, and exactness tests on it could not fail.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the a redis stream worker request token batch model queue result event abort chat user assistant "
    "system hello world fast slow river mountain cloud rain sun light dark green blue red yellow cat dog "
    "bird fish tree leaf stone water fire earth wind time day night year one two three four five six seven "
    "eight nine ten is are was were be have has had do does did will would can could should may might must "
    "and or but if then else when while for with without into onto over under about after before between "
    "café naïve über straße 東京 日本語 中文 😀 🚀 ∑ ∞ λ"
).split()


def _corpus(seed: int, num_lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(num_lines)]


def make_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 0, texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained on `texts` (default: a seeded word salad) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts if texts is not None else _corpus(seed), trainer=trainer)
    bos_id = bpe.token_to_id("<|bos|>")
    bpe.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _config(arch: str, vocab_size: int, tokenizer, hidden: int, num_layers: int, max_len: int,
            num_heads: int = 4, num_kv_heads: int = 2, intermediate: int | None = None,
            sliding_window: int | None = None):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_len,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        if sliding_window is None:
            return Qwen2Config(**common, use_sliding_window=False)
        # layers from max_window_layers on use the window: layer 0 full, the others sliding
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    raise ValueError(f"unknown tiny architecture {arch!r}; use llama or qwen2")


def scale_weights(model: torch.nn.Module, seed: int) -> None:
    """Embeddings std 1, matrices std 1/sqrt(fan_in), biases std 0.1: outputs that depend on inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                std = 1.0 if "embed" in name else 1.0 / math.sqrt(param.shape[1])
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, hidden: int = 64, num_layers: int = 2,
                    max_len: int = 1024, vocab_size: int = 512, num_heads: int = 4, num_kv_heads: int = 2,
                    intermediate: int | None = None, sliding_window: int | None = None) -> Path:
    """Build and save a seeded random model + tokenizer under out_dir (tiny by default); returns the path."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out, vocab_size=vocab_size, seed=seed)
    config = _config(arch, len(tokenizer), tokenizer, hidden, num_layers, max_len, num_heads, num_kv_heads, intermediate,
                     sliding_window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    scale_weights(model, seed)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(out)
    return out
