"""Tiny seeded stand-ins for CogVLM2, glm-4v-9b, MiniCPM-V-2.6 and Qwen-VL-Chat, as remote-code checkpoints.

Each directory looks like the family's hub repository as far as loading and input preparation go:
config.json's `auto_map` names classes in modeling_tiny_remote.py, copied next to the weights
(glm-4v's and Qwen-VL's tokenizers and MiniCPM-V's processor are remote classes too, named in their
own configs), so transformers loads them only under trust_remote_code. What each class offers is
described in remote_code/modeling_tiny_remote.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from worker.models.tiny import scale_weights
from worker.models.tiny_remote_vlm import MODELING_FILE, modeling_module
from worker.models.tiny_vlm import chat_template, train_tokenizer

FAMILIES = ("cogvlm2", "glm4v", "minicpmv", "qwenvl")
_MODULE = MODELING_FILE.stem
_SPECIALS = {
    "cogvlm2": [],
    "glm4v": ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>",
              "<|begin_of_image|>", "<|end_of_image|>", "<|endoftext|>"],
    "minicpmv": ["<image>", "</image>", "<unk>", "<|endoftext|>"],
    "qwenvl": ["<img>", "</img>", "<imgpad>"],
}
_CLASSES = {  # family: (config class, model class, remote tokenizer class or None)
    "cogvlm2": ("CogVLMConfig", "TinyCogVLMForCausalLM", None),
    "glm4v": ("ChatGLMConfig", "TinyChatGLMForConditionalGeneration", "TinyChatGLM4Tokenizer"),
    "minicpmv": ("MiniCPMVConfig", "TinyMiniCPMV", None),
    "qwenvl": ("QWenConfig", "TinyQWenLMHeadModel", "TinyQWenTokenizer"),
}


def make_tiny_family(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """Build and save the family's stand-in (weights, tokenizer, processor, modeling file) under out_dir."""
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = modeling_module()
    config_name, model_name, tokenizer_name = _CLASSES[family]
    tokenizer = train_tokenizer(_SPECIALS[family], seed)
    if family == "minicpmv":  # ChatML and <|im_end|> as eos, as MiniCPM-V-2.6's Qwen2 tokenizer
        tokenizer.chat_template = chat_template("")
        tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(out)
    if tokenizer_name is not None:
        _edit_json(out / "tokenizer_config.json", tokenizer_class=tokenizer_name,
                   auto_map={"AutoTokenizer": [None, f"{_MODULE}.{tokenizer_name}"]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS[family]}
    extra = {"cogvlm2": {},
             "glm4v": {"boi_token_id": ids.get("<|begin_of_image|>"), "eoi_token_id": ids.get("<|end_of_image|>")},
             "minicpmv": {},
             "qwenvl": {"visual": {"image_start_id": ids.get("<img>"), "image_size": 16}}}[family]
    config = getattr(module, config_name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                          tie_word_embeddings=False, architectures=[model_name.removeprefix("Tiny")],
                                          **extra)
    config.auto_map = {"AutoConfig": f"{_MODULE}.{config_name}", "AutoModelForCausalLM": f"{_MODULE}.{model_name}"}
    torch.manual_seed(seed)
    model = getattr(module, model_name)(config)
    scale_weights(model, seed)
    eos = [tokenizer.eos_token_id]
    if family == "glm4v":
        eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)
    (model.llm if family == "minicpmv" else model).generation_config = generation
    model.save_pretrained(out)
    if family == "minicpmv":
        generation.save_pretrained(out)
        auto = {"AutoProcessor": f"{_MODULE}.TinyMiniCPMVProcessor"}
        (out / "processor_config.json").write_text(json.dumps({"processor_class": "TinyMiniCPMVProcessor",
                                                                "auto_map": auto}))
    shutil.copy(MODELING_FILE, out / MODELING_FILE.name)
    return out


def _edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))
