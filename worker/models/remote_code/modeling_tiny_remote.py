"""A tiny vision-language model in the style of a `trust_remote_code` checkpoint (tests only).

This file is copied into the model directory and loaded by transformers from there (config.json's
`auto_map`), exactly as a hub repository's own modeling code is. Like CogVLM2 or MiniCPM-V its
forward does not follow transformers' standard interface: attention is its own matmul-softmax
(no attention-interface call the paged engine could hook), positions are a learned table indexed
by the cache length, and an image enters as `pixel_values` whose pooled patches are added to the
embedding of each `<image>` placeholder inside the forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


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
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=x.device)
        x = x + self.embed_positions(positions)[None]
        for i, block in enumerate(self.blocks):
            x = block(x, cache if use_cache else None, i)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(x)).float()
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)
