"""WorkerConfig: built once at the edge (CLI or env) and passed down."""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from producer.keys import DEFAULT_PREFIX, check_model_name
from producer.protocol import (
    DEFAULT_HEARTBEAT_TTL_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_RESULT_TTL_S,
)
from worker.models.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImagePolicy,
)

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
    """Every setting of a worker. The description of each field is its `redbatch worker --help` text:
    worker/cli_args.py generates the command's flags and defaults from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(description="the model's name on the wire (its request stream); required unless "
                                        "probing with --health / --ready")
    model_path: str = Field(description="local directory or hub id")
    redis_url: str = Field("redis://localhost:6379/0", description="redis://, rediss://, redis+cluster:// or "
                                                                   "redis+sentinel:// URL (env REDBATCH_REDIS_URL)")
    prefix: str = Field(DEFAULT_PREFIX, description="key prefix")
    worker_id: str = Field(default_factory=default_worker_id, description="consumer name in the group "
                                                                           "(default: host-pid-random)")
    device: str = Field("cpu", description="cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights and KV dtype")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads")
    trust_remote_code: bool = Field(False, description="let transformers run the model repository's own code")
    serve_mode: Literal["auto", "batched", "sequential"] = Field("auto", description=(
        "LLMs: batched = the continuous batch (the model must attend through transformers' attention interface); "
        "sequential = one request at a time through the model's own generate, for remote-code models whose forward "
        "the batch cannot drive (max-num-seqs is then how many wait); auto: batched, or sequential for a "
        "--trust-remote-code model that the batched engine cannot run"))
    # a model bigger than one device (docs/operations.md): accelerate's placement, or tensor parallelism
    device_map: str | None = Field(None, description=(
        "split the model over devices with accelerate: auto | balanced | balanced_low_0 | sequential, or a JSON "
        "object {module: device} inline or in a file (device: a GPU index, cpu or disk; cpu and disk are "
        "offloaded and run on the main GPU); --device is then unused"))
    max_memory: str | None = Field(None, description="with --device-map: per-device caps for the placement, e.g. "
                                                     "0=70GiB,1=70GiB,cpu=200GiB")
    offload_folder: str | None = Field(None, description="with --device-map: where modules mapped to disk are kept")
    tp_size: int = Field(1, ge=1, description=(
        "tensor parallel over this many processes (transformers' tp_plan), each on its own GPU: launch as "
        "torchrun --nproc-per-node N --no-python redbatch worker --tp-size N ..."))
    task: Literal["auto", "generate", "chat", "text_to_image"] = Field("auto", description=(
        "which engine serves the model: generate/chat = an LLM, text_to_image = a diffusers pipeline; auto: "
        "text_to_image when the model directory has a model_index.json"))

    max_num_seqs: int = Field(16, ge=1, le=4096, description="requests in the running batch at most (images, "
                                                             "for text_to_image)")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens in one step's forward at most "
                                                                "(longer prompts are prefilled in chunks)")
    max_model_len: int | None = Field(None, ge=2, description="prompt + output tokens at most (default: the "
                                                              "model's max_position_embeddings, capped at 8192)")
    max_tokens_limit: int = Field(32768, ge=1, description="largest max_tokens a request may ask for")
    kv_cache_tokens: int | None = Field(None, ge=16, description=(
        "KV cache budget in tokens (default: max-num-seqs x max-model-len, on CUDA what --gpu-memory-utilization "
        "leaves); the newest request is preempted and recomputed under pressure"))
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks across requests with a common prefix")
    attention_backend: Literal["auto", "sdpa", "flex"] = Field("auto", description=(
        "paged attention kernel: sdpa (one call per row group), flex (one flex_attention call per layer; compiled "
        "on CUDA, eager reference elsewhere); auto: flex on CUDA when it compiles"))
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="CUDA: share of device memory for weights, "
                                                                        "activations and the KV cache")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024, description="larger request bodies are refused")
    max_queue_len: int = Field(10_000, ge=0, description="producers refuse to enqueue past this queue length "
                                                         "(0: unbounded)")
    tool_parser: str = Field("auto", description="tool-call format: auto (detected from the chat template), none, "
                                                 "hermes, llama3_json, mistral or glm4")

    # vision chat (an LLM whose config has a vision_config)
    allow_image_urls: bool = Field(False, description="fetch http(s) image URLs in chat (off the loop thread); "
                                                      "default: only data: URIs")
    allow_image_files: bool = Field(False, description="read chat image parts that name a local path or file:// URL")
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1, description="one chat image's encoded size at most")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="one chat image's width x height at most")
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="timeout of the connection and each read of an "
                                                                 "image URL or file")

    read_block_ms: int = Field(1000, ge=1, description="how long an idle worker blocks on XREADGROUP")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="seconds between heartbeats")
    heartbeat_ttl_s: int = Field(DEFAULT_HEARTBEAT_TTL_S, ge=1, description=(
        "a worker whose heartbeat is older than this counts as stale (its heartbeat key expires)"))
    result_ttl_s: int = Field(DEFAULT_RESULT_TTL_S, ge=1, description=(
        "events streams, abort keys and id owners expire this long after the request ends"))
    grace_s: float = Field(30.0, ge=0, description="on SIGTERM, seconds the running requests get to finish "
                                                   "before they are handed back")
    lease_s: float = Field(30.0, gt=0, description="entries idle this long are reclaimed by another worker")
    max_deliveries: int = Field(3, ge=1, description="a request delivered more often goes to the dead letters")
    max_consecutive_step_failures: int = Field(3, ge=1, description=(
        "after this many failed steps in a row (a broken device), hand the requests back and exit with status 75"))
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics on this port "
                                                                       "(0: any free port)")
    health_file: str | None = Field(None, description=(
        "the worker writes its loop and heartbeat times here; probes read it (env REDBATCH_HEALTH_FILE)"))

    # text_to_image (the image engine)
    cpu_offload: bool = Field(False, description="CUDA: diffusers' model CPU offload (one pipeline component on the "
                                                 "GPU at a time) for a model that does not fit; see docs/engine.md")
    image_sizes: str | None = Field(None, description="comma-separated W*H sizes this worker serves (e.g. "
                                                      "1024*1024,768*1344); others get invalid_request (default: any)")
    max_images_per_request: int = Field(4, ge=1, le=16, description="the largest n of a text_to_image request")
    max_inference_steps: int = Field(100, ge=1, le=1000, description="the largest num_inference_steps")
    progress_every_steps: int = Field(5, ge=0, description="a progress event every this many denoising steps "
                                                           "(0: none)")
    max_sequence_length: int | None = Field(None, ge=1, le=512, description="T5 tokens per prompt (default: the "
                                                                          "stock pipeline's: FLUX 512, SD3 256)")
    image_output_dir: str | None = Field(None, description="also write each image here as "
                                                           "<request_id>-<index>.png (response_format url needs it)")

    @property
    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(allow_urls=self.allow_image_urls, allow_files=self.allow_image_files,
                           max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                           fetch_timeout_s=self.image_fetch_timeout_s)

    @property
    def device_map_value(self) -> str | dict[str, int | str] | None:
        """The device map as from_pretrained takes it (a strategy name or {module name: device})."""
        return None if self.device_map is None else parse_device_map(self.device_map)

    @property
    def max_memory_caps(self) -> dict[int | str, str] | None:
        return None if self.max_memory is None else parse_max_memory(self.max_memory)

    @field_validator("device_map")
    @classmethod
    def _check_device_map(cls, value: str | None) -> str | None:
        if value is not None:
            parse_device_map(value)
        return value

    @field_validator("max_memory")
    @classmethod
    def _check_max_memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_max_memory(value)
        return value

    @model_validator(mode="after")
    def _one_way_to_shard(self) -> WorkerConfig:
        if self.tp_size > 1 and self.serve_mode == "sequential":
            raise ValueError("serve_mode sequential runs the model's own generate in one process: not with tp_size > 1")
        if self.tp_size > 1 and self.device_map is not None:
            raise ValueError("device_map and tp_size > 1 are two ways to shard a model: choose one")
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError("max_memory and offload_folder only apply with a device_map")
        return self

    @property
    def allowed_image_sizes(self) -> tuple[str, ...] | None:
        if self.image_sizes is None:
            return None
        return tuple(s.strip() for s in self.image_sizes.split(",") if s.strip())

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
