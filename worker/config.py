"""WorkerConfig: built once at the edge (CLI or env) and passed down."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.keys import DEFAULT_PREFIX, check_model_name
from producer.protocol import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_RESULT_TTL_S


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
    # which engine: generate/chat = the LLM engine, text_to_image = a diffusers pipeline; auto: from the model dir
    task: Literal["auto", "generate", "chat", "text_to_image"] = "auto"

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

    # text_to_image (the image engine)
    cpu_offload: bool = False  # diffusers' model CPU offload: one component on the GPU at a time (CUDA only)
    image_sizes: tuple[str, ...] | None = None  # the "W*H" sizes served; None: any valid size
    max_images_per_request: int = Field(4, ge=1, le=16)
    max_inference_steps: int = Field(100, ge=1, le=1000)
    progress_every_steps: int = Field(5, ge=0)  # a progress event every this many denoising steps (0: none)
    max_sequence_length: int = Field(512, ge=1, le=512)  # T5 tokens per prompt
    image_output_dir: str | None = None  # also write each image here as <request_id>-<index>.png

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

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "cpu" and value != "cuda" and not value.startswith("cuda:") and value != "mps":
            raise ValueError("device must be cpu, cuda, cuda:N or mps")
        return value
