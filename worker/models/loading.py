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


def load_diffusers(path: str, device: str = "cpu", dtype: str = "auto", cpu_offload: bool = False):
    """A diffusers pipeline from `path` (model_index.json). CUDA: bfloat16 by default; cpu_offload keeps
    one component at a time on the GPU (diffusers' model offload), for models that do not fit."""
    from diffusers import DiffusionPipeline

    if cpu_offload and not device.startswith("cuda"):
        raise ModelLoadError("--cpu-offload needs a CUDA device (it moves each component to the GPU when it runs)")
    torch_dtype = torch.float32 if device == "cpu" and dtype == "auto" else (
        torch.bfloat16 if dtype == "auto" else resolve_dtype(dtype, device))
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load diffusers pipeline {path!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload:
        gpu_id = int(device.split(":")[1]) if ":" in device else None
        pipe.enable_model_cpu_offload(gpu_id=gpu_id)
    else:
        pipe.to(device)
    return pipe
