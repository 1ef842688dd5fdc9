"""Loading a causal LM and its tokenizer through the ordinary `from_pretrained` path.

A model too big for one device is loaded sharded, by the two mechanisms transformers offers:
accelerate's big-model placement (`device_map`: whole layers on different devices, the rest
offloaded to CPU or disk and run on the main device) or tensor parallelism (`tp_size` > 1,
under torchrun: every process loads its share of each layer's weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model or tokenizer could not be loaded: a config/deployment problem that stops the worker."""


@dataclass(frozen=True)
class Sharding:
    device_map: str | dict[str, int | str] | None = None  # auto | balanced | ... | {module name: device}
    max_memory: dict[int | str, str] | None = None  # with device_map: {0: "70GiB", "cpu": "200GiB"}
    offload_folder: str | None = None  # with device_map: where modules mapped to "disk" are kept
    tp_size: int = 1  # > 1: tensor parallel over that many torchrun processes

    @property
    def is_sharded(self) -> bool:
        return self.device_map is not None or self.tp_size > 1


def resolve_dtype(name: str, device: str) -> torch.dtype | str:
    if name == "auto":
        return torch.float32 if device == "cpu" else "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def load_llm(path: str, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False,
             sharding: Sharding = Sharding()):
    """`device` is where an unsharded model goes; a sharded one is placed by its device map, or (tensor
    parallel) on this process's accelerator (cuda:LOCAL_RANK, else the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if sharding.is_sharded:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device),
                                                     trust_remote_code=trust_remote_code, **_sharding_kwargs(sharding))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {path!r}: {exc}") from exc
    if not sharding.is_sharded:
        model = model.to(device)
    return model.eval(), tokenizer


def _sharding_kwargs(sharding: Sharding) -> dict:
    if sharding.tp_size > 1:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_size=sharding.tp_size)}  # the model's own tp_plan
    if sharding.device_map is None:
        return {}
    kwargs = {"device_map": sharding.device_map}
    if sharding.max_memory is not None:
        kwargs["max_memory"] = sharding.max_memory
    if sharding.offload_folder is not None:
        kwargs["offload_folder"] = sharding.offload_folder
    return kwargs


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
