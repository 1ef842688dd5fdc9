"""A tiny vision-language model in the style of a `trust_remote_code` checkpoint (tests only).

This file is copied into the model directory and loaded by transformers from there (config.json's
`auto_map`), exactly as a hub repository's own modeling code is. Like CogVLM2 or MiniCPM-V its
forward does not follow transformers' standard interface: attention is its own matmul-softmax
(no attention-interface call the paged engine could hook), positions are a learned table indexed
by the cache length, and an image enters as `pixel_values` whose pooled patches are added to the
embedding of each `<image>` placeholder inside the forward.

The same file also holds tiny stand-ins for the seed's four remote-code VLMs, over the same blocks.

No model hub is reachable here, so the real checkpoints cannot be run. Each of those classes offers the
*interface* its family's hub code offers (the calls a user makes and the inputs its forward reads),
over a small shared transformer, so that redbatch's input adapters (worker/engines/vlm_adapters.py)
are exercised through the same calls they make on the real models:

- CogVLM2 (cogvlm2-llama3-chat-19B): `model.build_conversation_input_ids(tokenizer, query=, history=,
  images=, template_version=)` gives 1-D `input_ids`, `token_type_ids` (1 = vision), `attention_mask`
  and `images`; `generate(..., token_type_ids=, images=[[tensor]])`. One image per conversation.
- glm-4v-9b: the tokenizer's own `apply_chat_template` takes `{"role": "user", "image": PIL, "content":
  text}` and returns `input_ids`, `attention_mask` and `images`; the forward puts the image between
  `<|begin_of_image|>` and `<|end_of_image|>`. One image. (The real forward expands a single placeholder
  into its patch count; this one keeps one placeholder per patch, which changes nothing for the caller.)
- MiniCPM-V-2.6: its processor turns prompts with `(<image>./</image>)` and image lists into `input_ids`,
  `image_bound`, `pixel_values`, `tgt_sizes`; `model.get_vllm_embedding(data)` makes the prompt's
  embeddings and `model.llm.generate(inputs_embeds=...)` decodes; `model.chat(image=None, msgs=,
  tokenizer=)` does all of it.
- Qwen-VL-Chat: `tokenizer.from_list_format([{"image": path}, {"text": ...}])` writes
  `Picture 1: <img>path</img>\\n`; the tokenizer encodes the path's bytes between `<img>` and `</img>`,
  padded to a fixed span; the forward reads the path back from the ids and opens the file itself;
  `make_context` builds ChatML; `model.chat(tokenizer, query, history)`.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.tokenization_utils_base import BatchEncoding


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote_vlm"

    def __init__(self, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, image_token_id=0, patch_size=8, patches_per_image=4, vision_config=None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.image_token_id = image_token_id
        self.patch_size = patch_size
        self.patches_per_image = patches_per_image  # a 16x16 image in 8x8 patches
        self.vision_config = vision_config if vision_config is not None else {"patch_size": patch_size}
        super().__init__(**kwargs)


class _Block(nn.Module):
    def __init__(self, config: TinyRemoteConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x, cache, layer_idx: int):
        b, t, h = x.shape  # [B, T, H]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, h // self.num_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, D]
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)  # [B, heads, past + T, D]
        past = k.shape[2] - t
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)  # [B, heads, T, past + T]
        future = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).triu(past + 1)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.norm2(x))


class TinyRemoteForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyRemoteConfig
    base_model_prefix = "tiny_remote"
    main_input_name = "input_ids"

    def __init__(self, config: TinyRemoteConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, hidden)
        self.patch_embed = nn.Linear(3 * config.patch_size ** 2 * config.patches_per_image, hidden)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _image_embeds(self, pixel_values):
        p = self.config.patch_size
        n = pixel_values.shape[0]
        patches = pixel_values.unfold(2, p, p).unfold(3, p, p)  # [n, C, h, w, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, -1)  # [n, h*w*C*p*p]
        return self.patch_embed(patches)  # [n, H]: one vector per image

    def forward(self, input_ids=None, attention_mask=None, cache=None, pixel_values=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        x = self.embed_tokens(input_ids)  # [B, T, H]
        is_image = input_ids == self.config.image_token_id
        if pixel_values is not None and bool(is_image.any()):
            images = self._image_embeds(pixel_values.to(x.dtype))  # [n, H], in placeholder order
            x = x.clone()
            x[is_image] = x[is_image] + images[: int(is_image.sum())]
        return decode(self, x, cache, use_cache, logits_to_keep)


def decode(model, x, cache, use_cache, logits_to_keep=0) -> CausalLMOutputWithPast:
    """The shared language model's pass over embeddings x [B, T, H]: learned positions indexed by the cache
    length, the blocks, the head (model has embed_positions, blocks, norm, lm_head)."""
    if use_cache and cache is None:
        cache = DynamicCache()
    past = cache.get_seq_length() if cache is not None else 0
    x = x + model.embed_positions(torch.arange(past, past + x.shape[1], device=x.device))[None]
    for i, block in enumerate(model.blocks):
        x = block(x, cache if use_cache else None, i)
    if logits_to_keep:
        x = x[:, -logits_to_keep:]
    return CausalLMOutputWithPast(logits=model.lm_head(model.norm(x)).float(), cache=cache if use_cache else None)


# ================================================================ the seed's remote-code VLM families

IMAGE_SIZE = 16
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # vectors per image
LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1  # CogVLM's token types
IMG_TOKEN_SPAN = 256  # Qwen-VL: ids between <img> and </img>, as the real one


def image_tensor(image: Image.Image) -> torch.Tensor:
    """[3, 16, 16] in [-1, 1]."""
    image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class TinyFamilyConfig(PretrainedConfig):
    model_type = "tiny_family"

    def __init__(self, vocab_size=600, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=1024, image_gain=1.0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.image_gain = image_gain
        super().__init__(**kwargs)


class CogVLMConfig(TinyFamilyConfig):
    model_type = "cogvlm2"

    def __init__(self, template_version="chat", **kwargs):
        self.template_version = template_version
        super().__init__(**kwargs)


class ChatGLMConfig(TinyFamilyConfig):
    model_type = "chatglm"

    def __init__(self, boi_token_id=0, eoi_token_id=0, vision_config=None, **kwargs):
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.vision_config = vision_config if vision_config is not None else {"image_size": IMAGE_SIZE}
        super().__init__(**kwargs)


class MiniCPMVConfig(TinyFamilyConfig):
    model_type = "minicpmv"

    def __init__(self, vision_config=None, query_num=NUM_PATCHES, **kwargs):
        self.vision_config = vision_config if vision_config is not None else {"image_size": IMAGE_SIZE}
        self.query_num = query_num
        super().__init__(**kwargs)


class QWenConfig(TinyFamilyConfig):
    model_type = "qwen"

    def __init__(self, visual=None, chat_format="chatml", max_window_size=448, **kwargs):
        self.visual = visual if visual is not None else {"image_start_id": 0, "image_size": IMAGE_SIZE}
        self.chat_format = chat_format
        self.max_window_size = max_window_size
        super().__init__(**kwargs)


class _Vision(nn.Module):
    """An image [n, 3, 16, 16] → NUM_PATCHES vectors each, [n, NUM_PATCHES, H]."""

    def __init__(self, config: TinyFamilyConfig):
        super().__init__()
        self.gain = config.image_gain
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        patches = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [n, C, h, w, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, NUM_PATCHES, -1)
        return self.patch_embed(patches) * self.gain


class TinyFamilyLM(PreTrainedModel, GenerationMixin):
    """The shared language model: token and learned position embeddings, causal SDPA blocks, a head."""

    config_class = TinyFamilyConfig
    base_model_prefix = "tiny_family"
    main_input_name = "input_ids"

    def __init__(self, config: TinyFamilyConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, hidden)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        x = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        return self.decode(x, cache, use_cache, logits_to_keep)

    def decode(self, x, cache, use_cache, logits_to_keep=0) -> CausalLMOutputWithPast:
        return decode(self, x, cache, use_cache, logits_to_keep)

    def past_length(self, cache) -> int:
        return cache.get_seq_length() if cache is not None else 0


def _scatter(x: torch.Tensor, where: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """x [B, T, H] with features [N, H] added at the N positions where `where` [B, T] is true, in order."""
    x = x.clone()
    x[where] = x[where] + features[: int(where.sum())].to(x.dtype)
    return x


# ---------------------------------------------------------------- CogVLM2


def _chat_old_history_to_prompt(history, query):
    prompt = "Question: "
    for old_query, response in history:
        prompt += old_query + " Answer: " + response + "\nQuestion: "
    return prompt + query + " Answer:"


class TinyCogVLMForCausalLM(TinyFamilyLM):
    config_class = CogVLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.vision = _Vision(config)
        self.post_init()

    def forward(self, input_ids=None, token_type_ids=None, images=None, attention_mask=None, cache=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        x = self.embed_tokens(input_ids)
        if images is not None and token_type_ids is not None and bool((token_type_ids == VISION_TOKEN_TYPE).any()):
            pixels = torch.stack([image for sample in images for image in sample])
            x = _scatter(x, token_type_ids == VISION_TOKEN_TYPE, self.vision(pixels.to(x.dtype)).flatten(0, 1))
        return self.decode(x, cache, use_cache, logits_to_keep)

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None, template_version=None,
                                     answer=None):
        assert images is None or len(images) <= 1, "not support multi images by now."
        template_version = template_version or self.config.template_version
        text = _chat_old_history_to_prompt(history or [], query) if template_version == "chat" else query
        input_ids, token_type_ids = [tokenizer.bos_token_id], [LANGUAGE_TOKEN_TYPE]
        pixels = None
        if images:
            pixels = [image_tensor(images[0])]
            input_ids += [tokenizer.pad_token_id] * NUM_PATCHES
            token_type_ids += [VISION_TOKEN_TYPE] * NUM_PATCHES
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += text_ids
        token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
                "attention_mask": torch.ones(len(input_ids), dtype=torch.long), "images": pixels}


# ---------------------------------------------------------------- glm-4v-9b


class TinyChatGLM4Tokenizer(PreTrainedTokenizerFast):
    """glm-4v's tokenizer: its own apply_chat_template, which takes a message's "image" and returns its tensor."""

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=True, return_tensors=None,
                            return_dict=False, **kwargs):
        text, images = "[gMASK]<sop>", []
        for message in conversation:
            text += f"<|{message['role']}|>\n"
            if message.get("image") is not None:
                images.append(message["image"])
                text += "<|begin_of_image|>" + "<|endoftext|>" * NUM_PATCHES + "<|end_of_image|>"
            text += message.get("content") or ""
        if add_generation_prompt:
            text += "<|assistant|>"
        if len(images) > 1:
            raise ValueError("glm-4v takes one image per conversation")
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        if not return_dict:
            return ids
        data = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if images:
            data["images"] = torch.stack([image_tensor(images[0])])
        return BatchEncoding(data)


class TinyChatGLMForConditionalGeneration(TinyFamilyLM):
    config_class = ChatGLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.vision = _Vision(config)
        self.post_init()

    def forward(self, input_ids=None, images=None, attention_mask=None, cache=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        x = self.embed_tokens(input_ids)
        if images is not None and self.past_length(cache) == 0:
            after_boi = (input_ids == self.config.boi_token_id).long().cumsum(-1)
            from_eoi = (input_ids == self.config.eoi_token_id).long().cumsum(-1)
            inside = (after_boi > from_eoi) & (input_ids != self.config.boi_token_id)
            if bool(inside.any()):
                x = _scatter(x, inside, self.vision(images.to(x.dtype)).flatten(0, 1))
        return self.decode(x, cache, use_cache, logits_to_keep)


# ---------------------------------------------------------------- MiniCPM-V-2.6


class TinyMiniCPMVProcessor:
    """MiniCPM-V's processor: `(<image>./</image>)` in a prompt becomes <image>, one <unk> per query, </image>."""

    pattern = "(<image>./</image>)"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path, **kwargs))

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass  # AutoProcessor calls it on a remote class (ProcessorMixin's does the bookkeeping)

    def __call__(self, text, images=None, max_slice_nums=None, use_image_id=None, return_tensors="pt",
                 max_length=None, **kwargs):
        tok = self.tokenizer
        unk, start, end = (tok.convert_tokens_to_ids(t) for t in ("<unk>", "<image>", "</image>"))
        rows, bounds, pixels, sizes, tgt = [], [], [], [], []
        for prompt, sample_images in zip(text, images or [[] for _ in text], strict=True):
            pieces = prompt.split(self.pattern)
            if len(pieces) - 1 != len(sample_images):
                raise ValueError("the prompt's image placeholders do not match its images")
            ids, bound = [], []
            for i, piece in enumerate(pieces):
                ids += tok.encode(piece, add_special_tokens=False)
                if i < len(sample_images):
                    ids.append(start)
                    bound.append([len(ids), len(ids) + NUM_PATCHES])
                    ids += [unk] * NUM_PATCHES + [end]
            if max_length is not None:
                ids = ids[:max_length]
            rows.append(ids)
            bounds.append(torch.tensor(bound, dtype=torch.long).reshape(-1, 2))
            pixels.append([image_tensor(im) for im in sample_images])
            sizes.append([im.size for im in sample_images])
            tgt.append(torch.tensor([[IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH]] * len(sample_images),
                                    dtype=torch.int32).reshape(-1, 2))
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        shift = [width - len(r) for r in rows]
        bounds = [b + s for b, s in zip(bounds, shift, strict=True)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels,
                "image_sizes": sizes, "image_bound": bounds, "tgt_sizes": tgt}


class TinyMiniCPMV(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "minicpmv"
    terminators = ("<|im_end|>", "<|endoftext|>")

    def __init__(self, config):
        super().__init__(config)
        self.llm = TinyFamilyLM(config)
        self.vpm = _Vision(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.llm.embed_tokens

    def get_output_embeddings(self):
        return self.llm.lm_head

    def get_vllm_embedding(self, data):
        embeds = self.llm.embed_tokens(data["input_ids"])  # [B, T, H]
        vision_hidden_states = []
        for i, (pixels, bound) in enumerate(zip(data["pixel_values"], data["image_bound"], strict=True)):
            if not len(pixels):
                vision_hidden_states.append([])
                continue
            features = self.vpm(torch.stack(pixels).to(embeds.dtype))  # [n, queries, H]
            vision_hidden_states.append(features)
            where = torch.zeros(embeds.shape[1], dtype=torch.bool, device=embeds.device)
            for s, e in bound.tolist():
                where[s:e] = True
            embeds = embeds.clone()
            embeds[i, where] = embeds[i, where] + features.flatten(0, 1)
        return embeds, vision_hidden_states

    def _decode(self, inputs_embeds, tokenizer, attention_mask, decode_text=False, **kwargs):
        terminators = [tokenizer.convert_tokens_to_ids(t) for t in self.terminators]
        output = self.llm.generate(inputs_embeds=inputs_embeds, pad_token_id=0, eos_token_id=terminators,
                                   attention_mask=attention_mask, **kwargs)
        if not decode_text:
            return output
        texts = []
        for row in output.tolist():
            while row and row[-1] in terminators:
                row = row[:-1]
            texts.append(tokenizer.decode(row).strip())
        return texts

    @torch.inference_mode()
    def generate(self, input_ids=None, pixel_values=None, tgt_sizes=None, image_bound=None, attention_mask=None,
                 tokenizer=None, vision_hidden_states=None, return_vision_hidden_states=False, stream=False,
                 decode_text=False, **kwargs):
        data = {"input_ids": input_ids, "pixel_values": pixel_values, "tgt_sizes": tgt_sizes,
                "image_bound": image_bound}
        embeds, _ = self.get_vllm_embedding(data)
        return self._decode(embeds, tokenizer, attention_mask, decode_text=decode_text, **kwargs)

    def chat(self, image, msgs, tokenizer, processor=None, vision_hidden_states=None, max_new_tokens=2048,
             min_new_tokens=0, sampling=True, max_inp_length=8192, system_prompt="", stream=False,
             max_slice_nums=None, use_image_id=None, **kwargs):
        processor = processor or TinyMiniCPMVProcessor(tokenizer)
        copy_msgs, images = [], []
        for i, msg in enumerate(msgs):
            content = msg["content"] if isinstance(msg["content"], list) else [msg["content"]]
            if i == 0 and image is not None and isinstance(content[0], str):
                content = [image] + content
            parts = []
            for c in content:
                if isinstance(c, Image.Image):
                    images.append(c)
                    parts.append(TinyMiniCPMVProcessor.pattern)
                else:
                    parts.append(c)
            copy_msgs.append({"role": msg["role"], "content": "\n".join(parts)})
        if system_prompt:
            copy_msgs.insert(0, {"role": "system", "content": system_prompt})
        prompt = tokenizer.apply_chat_template(copy_msgs, tokenize=False, add_generation_prompt=True)
        inputs = processor([prompt], [images], max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                           return_tensors="pt", max_length=max_inp_length)
        inputs.pop("image_sizes")
        config = ({"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True, "repetition_penalty": 1.05}
                  if sampling else {"num_beams": 3, "repetition_penalty": 1.2})
        config.update((k, kwargs[k]) for k in config.keys() & kwargs.keys())
        return self.generate(**inputs, tokenizer=tokenizer, max_new_tokens=max_new_tokens, stream=stream,
                             decode_text=True, **config)[0]


# ---------------------------------------------------------------- Qwen-VL-Chat


class TinyQWenTokenizer(PreTrainedTokenizerFast):
    """Qwen-VL's tokenizer: <img>path</img> becomes <img>, the path's bytes, <imgpad>… to the span, </img>."""

    image_start_tag, image_end_tag, image_pad_tag = "<img>", "</img>", "<imgpad>"
    IMAGE_ST = ("<img>", "</img>", "<imgpad>")

    @property
    def im_start_id(self) -> int:
        return self.convert_tokens_to_ids("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self.convert_tokens_to_ids("<|im_end|>")

    @property
    def img_start_id(self) -> int:
        return self.convert_tokens_to_ids(self.image_start_tag)

    def from_list_format(self, list_format):
        text, num_images = "", 0
        for element in list_format:
            if "image" in element:
                num_images += 1
                text += f"Picture {num_images}: {self.image_start_tag}{element['image']}{self.image_end_tag}\n"
            elif "text" in element:
                text += element["text"]
        return text

    def encode(self, text, allowed_special=None, add_special_tokens=False, **kwargs):
        ids = []
        for i, piece in enumerate(re.split(r"<img>(.*?)</img>", text)):
            if i % 2 == 0:
                ids += super().encode(piece, add_special_tokens=False) if piece else []
                continue
            path = list(piece.encode("utf-8"))
            if len(path) > IMG_TOKEN_SPAN:
                raise ValueError("the image path is longer than the image span")
            pad = self.img_start_id + 2
            ids += [self.img_start_id] + path + [pad] * (IMG_TOKEN_SPAN - len(path)) + [self.img_start_id + 1]
        return ids


def make_context(tokenizer, query, history=None, system="", max_window_size=6144, chat_format="chatml"):
    """ChatML context, newest history first until the window is full: (raw_text, context_tokens)."""
    history = history or []
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    nl = tokenizer.encode("\n")

    def turn(role, content):
        return f"{role}\n{content}", tokenizer.encode(role) + nl + tokenizer.encode(content)

    system_text, system_tokens = turn("system", system)
    system_tokens = [tokenizer.im_start_id] + system_tokens + [tokenizer.im_end_id]
    raw_text, context_tokens = "", []
    for turn_query, turn_response in reversed(history):
        q_text, q_tokens = turn("user", turn_query)
        r_text, r_tokens = turn("assistant", turn_response)
        tokens = nl + [tokenizer.im_start_id] + q_tokens + [tokenizer.im_end_id] + nl + [tokenizer.im_start_id] + \
            r_tokens + [tokenizer.im_end_id]
        text = f"\n{im_start}{q_text}{im_end}\n{im_start}{r_text}{im_end}"
        if len(system_tokens) + len(tokens) + len(context_tokens) >= max_window_size:
            break
        context_tokens = tokens + context_tokens
        raw_text = text + raw_text
    context_tokens = system_tokens + context_tokens
    raw_text = f"{im_start}{system_text}{im_end}" + raw_text
    context_tokens += nl + [tokenizer.im_start_id] + turn("user", query)[1] + [tokenizer.im_end_id] + nl + \
        [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
    raw_text += f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n"
    return raw_text, context_tokens


class TinyQWenLMHeadModel(TinyFamilyLM):
    config_class = QWenConfig

    def __init__(self, config):
        super().__init__(config)
        self.visual = _Vision(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, logits_to_keep=0, **kwargs):
        x = self.embed_tokens(input_ids)
        start = self.config.visual["image_start_id"]
        if self.past_length(cache) == 0 and bool((input_ids == start).any()):
            where = torch.zeros_like(input_ids, dtype=torch.bool)
            paths = []
            for row, col in (input_ids == start).nonzero().tolist():
                span = input_ids[row, col + 1: col + 1 + IMG_TOKEN_SPAN].tolist()
                paths.append(bytes(span[: span.index(start + 2)] if start + 2 in span else span).decode("utf-8"))
                where[row, col + 1: col + 1 + IMG_TOKEN_SPAN] = True
            pixels = torch.stack([image_tensor(Image.open(p)) for p in paths]).to(x.dtype)
            features = self.visual(pixels).repeat_interleave(IMG_TOKEN_SPAN // NUM_PATCHES, dim=1)
            x = _scatter(x, where, features.flatten(0, 1))
        return self.decode(x, cache, use_cache, logits_to_keep)

    def chat(self, tokenizer, query, history=None, system="You are a helpful assistant.", **kwargs):
        _, context_tokens = make_context(tokenizer, query, history=history, system=system,
                                         max_window_size=self.config.max_window_size)
        stop = [tokenizer.im_end_id, tokenizer.im_start_id]
        x = torch.tensor([context_tokens])
        out = self.generate(x, attention_mask=torch.ones_like(x), eos_token_id=stop + [tokenizer.eos_token_id],
                            pad_token_id=tokenizer.pad_token_id, **kwargs)[0, x.shape[1]:].tolist()
        while out and out[-1] in stop + [tokenizer.eos_token_id]:
            out = out[:-1]
        response = tokenizer.decode(out)
        return response, (history or []) + [(query, response)]
