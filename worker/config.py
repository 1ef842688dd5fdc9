"""WorkerConfig: built once at the edge (CLI or env) and passed down."""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from producer.keys import DEFAULT_PREFIX, check_model_name
from producer.protocol import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_RESULT_TTL_S


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str) -> str | dict[str, int | str]:
    """An accelerate strategy name, a JSON object {module name: device} inline, or a path to a JSON file
    holding one (devices: a GPU index, "cuda:N", "cpu" or "disk")."""
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if not text.lstrip().startswith("{"):
        if not os.path.isfile(text):
            raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object or a "
                             f"JSON file, not {text!r}")
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"device_map is not valid JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(d, (int, str)) for d in value.values()):
        raise ValueError("a device_map must map module names to devices (an int GPU index or a string)")
    return value


def parse_max_memory(text: str) -> dict[int | str, str]:
    """"0=70GiB,1=70GiB,cpu=200GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}."""
    caps: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ValueError(f"max_memory entries are DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB), not {part!r}")
        device = device.strip()
        caps[int(device) if device.isdigit() else device] = size.strip()
    return caps


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    model_path: str
    redis_url: str = "redis://localhost:6379/0"
    prefix: str = DEFAULT_PREFIX
    worker_id: str = Field(default_factory=default_worker_id)
    device: str = "cpu"
    dtype: str = "auto"
    num_threads: int | None = Field(None, ge=1)
    trust_remote_code: bool = False
    # a model bigger than one device: accelerate's placement, or tensor parallelism (torchrun); see docs/operations.md
    device_map: str | dict[str, int | str] | None = None  # auto|balanced|balanced_low_0|sequential, or {module: device}
    max_memory: dict[int | str, str] | None = None  # with device_map: per-device caps, e.g. {0: "70GiB", "cpu": "200GiB"}
    offload_folder: str | None = None  # with device_map: where modules mapped to "disk" are kept
    tp_size: int = Field(1, ge=1)  # > 1: tensor parallel over this many processes started by torchrun

    max_num_seqs: int = Field(16, ge=1, le=4096)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    max_tokens_limit: int = Field(32768, ge=1)
    kv_cache_tokens: int | None = Field(None, ge=16)  # KV budget; None: max_num_seqs x max_model_len (CUDA: memory)
    block_size: int = Field(16, ge=1, le=1024)  # tokens per KV cache block
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "sdpa", "flex"] = "auto"  # auto: flex on CUDA when it compiles, else sdpa
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # CUDA, without kv_cache_tokens: share of device memory
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    max_queue_len: int = Field(10_000, ge=0)  # producers refuse to enqueue past this; 0 = unbounded
    tool_parser: str = "auto"  # tool-call format: auto (detected from the chat template), none, or a format name

    read_block_ms: int = Field(1000, ge=1)  # how long an idle worker blocks on XREADGROUP
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_ttl_s: int = Field(DEFAULT_HEARTBEAT_TTL_S, ge=1)
    result_ttl_s: int = Field(DEFAULT_RESULT_TTL_S, ge=1)
    grace_s: float = Field(30.0, ge=0)
    lease_s: float = Field(30.0, gt=0)  # an entry idle this long is reclaimed by another worker
    max_deliveries: int = Field(3, ge=1)
    max_consecutive_step_failures: int = Field(3, ge=1)  # then the device counts as broken: hand back, exit
    metrics_port: int | None = Field(None, ge=0, le=65535)  # serve Prometheus metrics on this port (0: any free)
    health_file: str | None = None  # write loop/heartbeat times here for `redbatch worker --health` probes

    @field_validator("model_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("tool_parser")
    @classmethod
    def _check_tool_parser(cls, value: str) -> str:
        from worker.models.tool_parsers import FORMATS

        if value not in ("auto", "none", *FORMATS):
            raise ValueError(f"tool_parser must be auto, none or one of {', '.join(FORMATS)}")
        return value

    @field_validator("device_map", mode="before")
    @classmethod
    def _parse_device_map(cls, value):
        return parse_device_map(value) if isinstance(value, str) else value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _parse_max_memory(cls, value):
        return parse_max_memory(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_way_to_shard(self) -> "WorkerConfig":
        if self.tp_size > 1 and self.device_map is not None:
            raise ValueError("device_map and tp_size > 1 are two ways to shard a model: choose one")
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError("max_memory and offload_folder only apply with a device_map")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "cpu" and value != "cuda" and not value.startswith("cuda:") and value != "mps":
            raise ValueError("device must be cpu, cuda, cuda:N or mps")
        return value
