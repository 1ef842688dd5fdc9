"""Loading a causal LM and its tokenizer through the ordinary `from_pretrained` path.

A model too big for one device is loaded sharded, by the two mechanisms transformers offers:
accelerate's big-model placement (`device_map`: whole layers on different devices, the rest
offloaded to CPU or disk and run on the main device) or tensor parallelism (`tp_size` > 1,
under torchrun: every process loads its share of each layer's weights).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("redbatch.worker")
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
    model, tokenizer, _ = load_model(path, device, dtype, trust_remote_code, sharding)
    return model, tokenizer


def is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_model(path: str, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False,
               sharding: Sharding = Sharding()):
    """(model, tokenizer, image_processor): a vision-language model (its config has a `vision_config`) loads
    with AutoModelForImageTextToText and its image processor; anything else with AutoModelForCausalLM and
    image_processor None. The image processor alone (not AutoProcessor): a processor that also handles
    video needs torchvision, which the image path does not.

    `device` is where an unsharded model goes; a sharded one is placed by its device map, or (tensor
    parallel) on this process's accelerator (cuda:LOCAL_RANK, else the CPU)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    if sharding.is_sharded:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not trust_remote_code:
        check_no_remote_code(path)
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = None
        auto_class = AutoModelForCausalLM
        if is_vision_config(config) and not _is_remote_text_only(config):
            auto_class = AutoModelForImageTextToText
            image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        elif is_vision_config(config):
            image_processor = _remote_image_processor(path, kwargs)
        model = auto_class.from_pretrained(path, dtype=resolve_dtype(dtype, device), **kwargs,
                                           **_sharding_kwargs(sharding))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"cannot load model {path!r}: {exc}") from exc
    if not sharding.is_sharded:
        model = model.to(device)
    return model.eval(), tokenizer, image_processor


def _is_remote_text_only(config) -> bool:
    """A remote-code VLM that maps only AutoModelForCausalLM (glm-4v-9b, CogVLM2, MiniCPM-V-2.6): it loads
    through that class, with its image processor when it has one."""
    auto_map = getattr(config, "auto_map", None) or {}
    return "AutoModelForImageTextToText" not in auto_map and "AutoModelForCausalLM" in auto_map


def _remote_image_processor(path: str, kwargs: dict):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        log.warning("no image processor loads for %s (%s): chat image parts will be refused, unless the model is "
                    "one of the remote-code families served through their own input code (CogVLM2, glm-4v, "
                    "MiniCPM-V, Qwen-VL: docs/engine.md)", path, exc)
        return None


def check_no_remote_code(path: str) -> None:
    """A local model directory whose config.json maps Auto classes to its own modules (`auto_map`) runs that
    code when loaded: refuse it, saying so, unless the worker was started with --trust-remote-code."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # a hub id, or no config: transformers' own check applies
    try:
        auto_map = json.loads(config_file.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports the unreadable config
    if auto_map:
        modules = sorted({str(v).split(".")[0] for v in auto_map.values()} if isinstance(auto_map, dict) else [])
        raise ModelLoadError(f"model {path!r} ships its own code ({', '.join(modules) or 'auto_map'} in the model "
                             f"directory, named by config.json's auto_map): loading it would run that code. Start "
                             f"the worker with --trust-remote-code if you trust it")


def is_remote_code(model) -> bool:
    """The model's class comes from the model repository's own code, not from transformers."""
    return not type(model).__module__.startswith("transformers.")


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


def diffusers_class_name(path: str) -> str:
    """The pipeline class a diffusers model directory names (model_index.json's `_class_name`)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path!r}/model_index.json: {exc}") from exc
    return str(index.get("_class_name", "")) if isinstance(index, dict) else ""


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
