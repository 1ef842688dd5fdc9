"""Loading a causal LM and its tokenizer through the ordinary `from_pretrained` path."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model or tokenizer could not be loaded: a config/deployment problem that stops the worker."""


def resolve_dtype(name: str, device: str) -> torch.dtype | str:
    if name == "auto":
        return torch.float32 if device == "cpu" else "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def load_llm(path: str, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {path!r}: {exc}") from exc
    return model.to(device).eval(), tokenizer
