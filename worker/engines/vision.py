"""Vision chat for models transformers supports natively (Qwen2-VL and successors, LLaVA, GLM-4.1V, ...).

At admission (between steps, off the step's critical path) a chat request's images are decoded,
run through the model's image processor and its own `get_image_features` one image at a time,
and the prompt is the chat template's text with each image's placeholder token repeated once per
feature row. The step then enters the prompt as `inputs_embeds`: the token embeddings with each
image token's row replaced by its feature row, which is exactly what the model's own forward does
with `pixel_values`. Models with M-RoPE (a `get_rope_index` on the inner model) get their
[3, P] prompt positions from that same function, and output token p sits at p + rope_delta.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from producer.protocol import ChatBody, ErrorCode
from worker.engines.base import RequestRejected
from worker.models.images import ImageError, ImagePolicy


@dataclass
class VisionPrompt:
    prompt_ids: list[int]  # the image placeholders already expanded
    features: list[torch.Tensor]  # per image [n_i, H] on the model's device, in prompt order
    spans: list[tuple[int, int, str]]  # per image (first token, one past the last, digest of its pixels)
    mrope: list[list[int]] | None  # [3][P] rope positions (t, h, w) of the prompt, for M-RoPE models
    rope_delta: int  # position of token p >= P is p + rope_delta


class VisionModel:
    """Turns chat messages with image parts into a VisionPrompt for one loaded VLM."""

    def __init__(self, model, tokenizer, image_processor, policy: ImagePolicy = ImagePolicy()):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.policy = policy
        self.image_token_id = int(model.config.image_token_id)
        inner = getattr(model, "model", None)
        self._rope_index = getattr(inner, "get_rope_index", None)  # M-RoPE (Qwen2-VL, Qwen2.5-VL, GLM-4.1V)
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype

    @property
    def uses_mrope(self) -> bool:
        return self._rope_index is not None

    def prepare(self, body: ChatBody, text_ids: list[int]) -> VisionPrompt:
        """`text_ids`: the rendered chat template, one placeholder token per image part."""
        urls = [p.image_url.url for m in body.messages if isinstance(m.content, list)
                for p in m.content if p.type == "image_url"]
        slots = [i for i, t in enumerate(text_ids) if t == self.image_token_id]
        if len(slots) != len(urls):
            raise RequestRejected(ErrorCode.INVALID_REQUEST,
                                  f"the chat template wrote {len(slots)} image placeholders for {len(urls)} images")
        prompt_ids: list[int] = []
        features, spans, grids = [], [], []
        last = 0
        for slot, url in zip(slots, urls):
            feats, digest, grid = self._image(url)
            prompt_ids += text_ids[last:slot]
            spans.append((len(prompt_ids), len(prompt_ids) + feats.shape[0], digest))
            prompt_ids += [self.image_token_id] * feats.shape[0]
            features.append(feats)
            grids.append(grid)
            last = slot + 1
        prompt_ids += text_ids[last:]
        mrope, delta = self._positions(prompt_ids, grids) if self.uses_mrope else (None, 0)
        return VisionPrompt(prompt_ids, features, spans, mrope, delta)

    def _image(self, url: str) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        try:
            image = self.policy.open(self.policy.read(url))
        except ImageError as exc:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, str(exc)) from None
        try:
            inputs = self.image_processor(images=[image], return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as exc:  # e.g. an image too small for the patch grid
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"the image processor refused the image: {exc}") from None
        pixels = inputs["pixel_values"]
        grid = inputs.get("image_grid_thw")
        digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16)
        if grid is not None:
            digest.update(grid.numpy().tobytes())
        kwargs = {k: v.to(self.device) for k, v in inputs.items() if k != "pixel_values" and torch.is_tensor(v)}
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype), return_dict=True,
                                                **kwargs)
        pooled = out.pooler_output
        parts = list(pooled) if isinstance(pooled, (list, tuple)) else [pooled]
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in parts]).to(self.dtype)  # [n, H]
        return feats, digest.hexdigest(), grid

    def _positions(self, prompt_ids: list[int], grids: list[torch.Tensor]) -> tuple[list[list[int]], int]:
        ids = torch.tensor([prompt_ids])
        kinds = (ids == self.image_token_id).int()
        with torch.inference_mode():
            positions, delta = self._rope_index(ids, kinds, image_grid_thw=torch.cat(grids) if grids else None)
        return positions[:, 0].tolist(), int(delta.reshape(-1)[0])
