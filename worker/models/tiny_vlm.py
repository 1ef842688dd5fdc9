"""Tiny seeded random vision-language models (Qwen2-VL, Qwen2.5-VL, LLaVA, GLM-4.1V) for tests.

Each is built from a config offline, with a locally trained tokenizer that has the family's image
special tokens and a chat template that renders image parts as the family's placeholder, plus the
family's PIL image processor (sized so that a small image is a handful of tokens), and saved with
`save_pretrained`: the engine loads them through the same Auto classes as a real checkpoint.
Weights are scaled up as in tiny.py so that the greedy output depends on the image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.models.tiny import _corpus, scale_weights

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "glm4v")
_BASE_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
# per family: the special tokens, and what the chat template writes for one image part
_IMAGE_MARKUP = {
    "qwen2_vl": (["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                 "<|vision_start|><|image_pad|><|vision_end|>"),
    "llava": (["<image>"], "<image>\n"),
    "glm4v": (["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
               "<|video|>"], "<|begin_of_image|><|image|><|end_of_image|>"),
}
_IMAGE_MARKUP["qwen2_5_vl"] = _IMAGE_MARKUP["qwen2_vl"]


def chat_template(image_markup: str) -> str:
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}" + image_markup +
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _tokenizer(family: str, out: Path, seed: int):
    image_specials, markup = _IMAGE_MARKUP[family]
    tokenizer = train_tokenizer(image_specials, seed)
    tokenizer.chat_template = chat_template(markup)
    tokenizer.save_pretrained(out)
    return tokenizer


def train_tokenizer(image_specials: list[str], seed: int):
    """A byte-level BPE on the seeded word salad, with the base and the family's special tokens (not saved)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _BASE_SPECIALS + image_specials
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = bpe.token_to_id("<|bos|>")
    bpe.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=specials[3:])


def _text(tokenizer, **extra) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **extra)


def _ids(tokenizer, **names: str) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def _config_and_processor(family: str, tokenizer):
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16: 8 pairs
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        config = Qwen2VLConfig(text_config=_text(tokenizer, rope_parameters=mrope),
                               vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
                               **_ids(tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                                      vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"))
        return config, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=_text(tokenizer, rope_parameters=mrope), vision_config=vision,
                                  **_ids(tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                                         vision_start_token_id="<|vision_start|>",
                                         vision_end_token_id="<|vision_end|>"))
        return config, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
        config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text(tokenizer)),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-1, projector_hidden_act="gelu")
        size = {"shortest_edge": 32}
        return config, LlavaImageProcessorPil(size=size, crop_size={"height": 32, "width": 32})
    if family == "glm4v":
        from transformers import Glm4vConfig
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "partial_rotary_factor": 1.0}
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, image_size=56)
        config = Glm4vConfig(text_config=_text(tokenizer, rope_parameters=rope), vision_config=vision,
                             **_ids(tokenizer, image_token_id="<|image|>", video_token_id="<|video|>",
                                    image_start_token_id="<|begin_of_image|>", image_end_token_id="<|end_of_image|>",
                                    video_start_token_id="<|begin_of_video|>", video_end_token_id="<|end_of_video|>"))
        return config, Glm4vImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 16})
    raise ValueError(f"unknown tiny VLM family {family!r}; use one of {', '.join(FAMILIES)}")


def make_tiny_vlm(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Build and save a seeded random VLM, its tokenizer and its image processor under out_dir."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(family, out, seed)
    config, image_processor = _config_and_processor(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    scale_weights(model, seed)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, do_sample=False,
                                               eos_token_id=[tokenizer.eos_token_id, im_end],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out
