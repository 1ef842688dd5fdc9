"""Chat requests in the shape that a remote-code vision model's own code expects (one-at-a-time path).

The generic input path (the tokenizer's chat template with one placeholder per image part, then the
image processor's tensors) is what native vision models and well-behaved remote ones take. The seed's
four remote-code VLMs each have their own way instead, and an image request built the generic way
would fail or be read wrongly:

| family | how a conversation with images becomes inputs (its own code) |
|---|---|
| CogVLM2 | `model.build_conversation_input_ids(tokenizer, query=, history=, images=)`; generate with `token_type_ids` and `images=[[tensor]]`; one image |
| glm-4v-9b | the tokenizer's `apply_chat_template` with `"image"` in a message, `return_dict=True`; one image |
| MiniCPM-V-2.6 | `(<image>./</image>)` per image in the ChatML text, its processor (`image_bound`, `tgt_sizes`), `get_vllm_embedding`, then its `llm.generate(inputs_embeds=)` |
| Qwen-VL-Chat | `tokenizer.from_list_format` writes `<img>path</img>`, `make_context` builds ChatML; its forward opens the path itself |

An adapter does exactly that, through the family's own functions, and hands the sequential engine
`generate` inputs plus the prompt's ids (for lengths, usage and resume). It refuses clearly what the
family cannot take (tools, more images than it reads, an image in an assistant turn, a system turn
where it has none). Chosen by `adapter_for` from what the loaded model and tokenizer offer.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from producer.protocol import ChatBody, ErrorCode
from worker.engines.base import RequestRejected

log = logging.getLogger("redbatch.engine")


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    text: str
    images: tuple = ()  # PIL images, in the order of the message's parts


@dataclass
class FamilyInputs:
    prompt_ids: list[int]
    inputs: dict[str, Any]  # keyword arguments of the adapter's generate
    cleanup: Callable[[], None] | None = None  # run once the request is done with them


def chat_turns(body: ChatBody, open_image: Callable[[str], Any]) -> list[Turn]:
    """The conversation as turns: text parts joined by newlines, image parts opened (ImageError on a bad one)."""
    turns = []
    for m in body.messages:
        if isinstance(m.content, list):
            text = "\n".join(p.text for p in m.content if p.type == "text")
            images = tuple(open_image(p.image_url.url) for p in m.content if p.type == "image_url")
        else:
            text, images = m.content or "", ()
        turns.append(Turn(m.role, text, images))
    return turns


def _refuse(message: str):
    raise RequestRejected(ErrorCode.INVALID_REQUEST, message)


class InputAdapter:
    family = "?"
    roles: tuple[str, ...] = ("system", "user", "assistant")
    max_images: int | None = 1  # per conversation; None: any number

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    @classmethod
    def matches(cls, model, tokenizer) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------ what every family checks

    def check(self, body: ChatBody) -> None:
        """Refuse, before any image is opened, what this family's input code cannot take."""
        if body.tools or body.tool_choice not in (None, "none"):
            _refuse(f"tools are not available for {self.family} (its own input code takes no tool definitions)")
        images = 0
        for i, m in enumerate(body.messages):
            if m.role not in self.roles:
                _refuse(f"{self.family} takes {', '.join(self.roles)} messages, not {m.role!r} (messages[{i}])")
            if m.tool_calls:
                _refuse(f"{self.family} takes no assistant tool_calls (messages[{i}])")
            if m.role == "system" and i != 0:
                _refuse(f"{self.family} takes a system message only first (messages[{i}])")
            if m.has_images and m.role != "user":
                _refuse(f"images go in user messages (messages[{i}] is {m.role!r})")
            images += sum(p.type == "image_url" for p in m.content) if isinstance(m.content, list) else 0
        if self.max_images is not None and images > self.max_images:
            _refuse(f"{self.family} reads at most {self.max_images} image(s) per conversation; this one has {images}")
        if body.messages[-1].role != "user":
            _refuse(f"the last message must be the user's for {self.family}")

    def build(self, turns: list[Turn]) -> FamilyInputs:
        raise NotImplementedError

    def plain(self, ids: list[int]) -> dict[str, Any]:
        """Inputs for a prompt given as ids (a generate request): text only."""
        x = torch.tensor([ids], device=self.device)
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}

    def extend(self, inputs: dict[str, Any], output_ids: list[int]) -> dict[str, Any]:
        """The inputs with tokens already published appended (a resumed request goes on after them)."""
        if not output_ids:
            return inputs
        out = dict(inputs)
        more = torch.tensor([output_ids], device=inputs["input_ids"].device, dtype=inputs["input_ids"].dtype)
        out["input_ids"] = torch.cat([inputs["input_ids"], more], dim=1)
        if "attention_mask" in inputs:
            mask = inputs["attention_mask"]
            out["attention_mask"] = torch.cat([mask, torch.ones_like(more, dtype=mask.dtype)], dim=1)
        if "token_type_ids" in inputs:  # CogVLM: what follows the prompt is language
            types = inputs["token_type_ids"]
            out["token_type_ids"] = torch.cat([types, torch.zeros_like(more, dtype=types.dtype)], dim=1)
        if "position_ids" in inputs:
            pos = inputs["position_ids"]
            last = pos[..., -1:]
            out["position_ids"] = torch.cat([pos, last + torch.arange(1, len(output_ids) + 1, device=pos.device)],
                                            dim=-1)
        return out

    def generate(self, inputs: dict[str, Any], **kwargs):
        return self.model.generate(**inputs, **kwargs)

    def extra_eos_ids(self) -> set[int]:
        """Token ids that end a reply in this family's own chat code beyond the model's eos_token_id."""
        return set()

    def close(self) -> None:
        pass

    # ------------------------------------------------------------ helpers

    def _pairs(self, turns: list[Turn]) -> tuple[str | None, list[tuple[Turn, Turn]], Turn]:
        """(system text, [(user, assistant)] history, the last user turn), for families that take
        alternating turns."""
        system = turns[0].text if turns[0].role == "system" else None
        rest = turns[1:] if system is not None else turns
        for i, turn in enumerate(rest):
            if turn.role != ("user" if i % 2 == 0 else "assistant"):
                _refuse(f"{self.family} takes alternating user and assistant messages")
        pairs = [(rest[i], rest[i + 1]) for i in range(0, len(rest) - 1, 2)]
        return system, pairs, rest[-1]

    def _ids(self, input_ids: torch.Tensor) -> list[int]:
        return [int(t) for t in input_ids.reshape(-1).tolist()]

    def _to_device(self, data: dict[str, Any]) -> dict[str, Any]:
        dtype = self.model.get_input_embeddings().weight.dtype

        def move(value):
            if torch.is_tensor(value):
                return value.to(self.device, dtype) if value.is_floating_point() else value.to(self.device)
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        return {k: move(v) for k, v in data.items()}


class CogVLM2Adapter(InputAdapter):
    """THUDM/cogvlm2-llama3-chat-19B and its siblings: the model's build_conversation_input_ids ('chat')."""

    family = "CogVLM2"
    roles = ("user", "assistant")

    @classmethod
    def matches(cls, model, tokenizer) -> bool:
        return callable(getattr(model, "build_conversation_input_ids", None))

    def build(self, turns: list[Turn]) -> FamilyInputs:
        _, pairs, last = self._pairs(turns)
        images = [im for t in turns for im in t.images]
        built = self.model.build_conversation_input_ids(
            self.tokenizer, query=last.text, history=[(u.text, a.text) for u, a in pairs],
            images=images or None, template_version="chat")
        inputs = {"input_ids": built["input_ids"][None], "token_type_ids": built["token_type_ids"][None],
                  "attention_mask": built["attention_mask"][None],
                  "images": [[built["images"][0]]] if images else None}
        inputs = self._to_device(inputs)
        return FamilyInputs(self._ids(built["input_ids"]), inputs)

    def plain(self, ids: list[int]) -> dict[str, Any]:
        inputs = super().plain(ids)  # CogVLM's generate needs token_type_ids with text too
        return {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"]), "images": None}


class Glm4vAdapter(InputAdapter):
    """THUDM/glm-4v-9b: its tokenizer's apply_chat_template with the image inside the message."""

    family = "glm-4v"

    @classmethod
    def matches(cls, model, tokenizer) -> bool:
        return (getattr(model.config, "model_type", None) == "chatglm"
                and getattr(model.config, "vision_config", None) is not None)

    def build(self, turns: list[Turn]) -> FamilyInputs:
        messages = []
        for turn in turns:
            message = {"role": turn.role, "content": turn.text}
            if turn.images:
                message["image"] = turn.images[0]
            messages.append(message)
        built = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_tensors="pt", return_dict=True)
        inputs = self._to_device({k: v for k, v in dict(built).items() if torch.is_tensor(v)})
        return FamilyInputs(self._ids(inputs["input_ids"]), inputs)


class MiniCPMVAdapter(InputAdapter):
    """openbmb/MiniCPM-V-2_6: what its chat() does (placeholders, its processor, get_vllm_embedding), then its
    language model's generate with redbatch's own arguments (its generate fixes eos and pad itself)."""

    family = "MiniCPM-V"
    max_images = None
    pattern = "(<image>./</image>)"

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        from transformers import AutoProcessor, PreTrainedTokenizerBase

        self.processor = AutoProcessor.from_pretrained(model.name_or_path, trust_remote_code=True)
        if isinstance(self.processor, PreTrainedTokenizerBase):  # AutoProcessor's fallback when none is configured
            raise TypeError(f"{model.name_or_path} has no processor (processor_config.json / preprocessor_config.json)")
        self.terminators = {tokenizer.convert_tokens_to_ids(t) for t in getattr(model, "terminators", ())}

    @classmethod
    def matches(cls, model, tokenizer) -> bool:
        return callable(getattr(model, "get_vllm_embedding", None)) and hasattr(model, "llm")

    def build(self, turns: list[Turn]) -> FamilyInputs:
        messages = [{"role": t.role, "content": "\n".join([self.pattern] * len(t.images) + [t.text])}
                    for t in turns]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [im for t in turns for im in t.images]
        if not images:
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            return FamilyInputs(list(ids), self.plain(list(ids)))
        built = dict(self.processor([prompt], [images], return_tensors="pt"))
        built.pop("image_sizes", None)
        built["input_ids"] = built["input_ids"].long()
        built["attention_mask"] = built["attention_mask"].long()
        inputs = self._to_device(built)
        return FamilyInputs(self._ids(inputs["input_ids"]), inputs)

    def generate(self, inputs: dict[str, Any], **kwargs):
        if "image_bound" not in inputs:
            return self.model.llm.generate(**inputs, **kwargs)
        data = {k: inputs[k] for k in ("input_ids", "pixel_values", "tgt_sizes", "image_bound")}
        embeds, _ = self.model.get_vllm_embedding(data)
        return self.model.llm.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **kwargs)

    def extra_eos_ids(self) -> set[int]:
        return set(self.terminators)


class QwenVLAdapter(InputAdapter):
    """Qwen/Qwen-VL-Chat: from_list_format and the model's own make_context (ChatML). Its forward opens each
    image by the path written in the prompt, so every image (a data: URI, or a URL the worker fetched) is
    written to a file in a directory of this worker's and removed when its request is done; a path or
    <img> markup in the request's own text is refused (the model would open whatever it names)."""

    family = "Qwen-VL"
    max_images = None
    default_system = "You are a helpful assistant."  # what its chat() passes

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        module = sys.modules.get(type(model).__module__)
        self.make_context = getattr(module, "make_context", None)
        if self.make_context is None:
            raise TypeError("Qwen-VL's modeling code has no make_context")
        self.image_start_id = int(model.config.visual["image_start_id"])
        self.tmpdir = Path(tempfile.mkdtemp(prefix="redbatch-qwenvl-"))
        gen = getattr(model, "generation_config", None)
        self.max_window_size = int(getattr(gen, "max_window_size", None)
                                   or getattr(model.config, "max_window_size", None) or 6144)

    @classmethod
    def matches(cls, model, tokenizer) -> bool:
        visual = getattr(model.config, "visual", None)
        return (callable(getattr(tokenizer, "from_list_format", None)) and isinstance(visual, dict)
                and "image_start_id" in visual)

    def check(self, body: ChatBody) -> None:
        super().check(body)
        for i, m in enumerate(body.messages):
            texts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content or [] if p.text]
            if any("<img>" in t or "</img>" in t for t in texts):
                _refuse(f"messages[{i}]: <img> markup in text is not accepted; send images as image_url parts")

    def build(self, turns: list[Turn]) -> FamilyInputs:
        system, pairs, last = self._pairs(turns)
        files: list[Path] = []

        def query(turn: Turn) -> str:
            parts = []
            for image in turn.images:
                path = self.tmpdir / f"{uuid.uuid4().hex}.png"
                image.save(path, format="PNG")
                files.append(path)
                parts.append({"image": str(path)})
            return self.tokenizer.from_list_format(parts + [{"text": turn.text}])

        def cleanup() -> None:
            for path in files:
                path.unlink(missing_ok=True)

        try:
            history = [(query(u), a.text) for u, a in pairs]
            _, tokens = self.make_context(self.tokenizer, query(last), history=history,
                                          system=self.default_system if system is None else system,
                                          max_window_size=self.max_window_size, chat_format="chatml")
        except BaseException:
            cleanup()
            raise
        return FamilyInputs(list(tokens), self.plain(list(tokens), own=True), cleanup)

    def plain(self, ids: list[int], own: bool = False) -> dict[str, Any]:
        if not own and self.image_start_id in ids:
            _refuse("the prompt holds Qwen-VL's image markup (<img>); send images in a chat request as image_url parts")
        return super().plain(ids)

    def extra_eos_ids(self) -> set[int]:
        return {self.tokenizer.im_end_id, self.tokenizer.im_start_id}  # its chat()'s stop words

    def close(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


ADAPTERS = (CogVLM2Adapter, Glm4vAdapter, MiniCPMVAdapter, QwenVLAdapter)


def adapter_for(model, tokenizer) -> InputAdapter | None:
    """The input adapter for a remote-code model of one of the seed's vision families, else None."""
    from worker.models.loading import ModelLoadError, is_remote_code

    if not is_remote_code(model):
        return None
    for cls in ADAPTERS:
        if cls.matches(model, tokenizer):
            log.info("input adapter %s for %s", cls.family, type(model).__name__)
            try:
                return cls(model, tokenizer)
            except Exception as exc:  # its processor or modeling code is missing or broken: a deployment problem
                raise ModelLoadError(f"the {cls.family} input adapter cannot start: {type(exc).__name__}: {exc}") \
                    from exc
    return None
