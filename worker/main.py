"""Building a worker from its config and running it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from producer.connection import connect
from worker.config import WorkerConfig

log = logging.getLogger("redbatch.worker")
EXIT_ENGINE_FAILED = 75  # EX_TEMPFAIL: steps kept failing, the requests are handed back; restart the process


def build_worker(config: WorkerConfig, engine=None):
    """`engine`: already built (a tensor-parallel rank 0 builds it before it knows it is rank 0)."""
    import torch

    from worker.loop import Worker
    from worker.streams import WorkerStreams

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    engine = engine if engine is not None else build_engine(config)
    client = connect(config.redis_url, health_check_interval=30)
    return Worker(config, engine, WorkerStreams(client, config))


def build_engine(config: WorkerConfig):
    """The engine for the worker's task: --task, or what the model directory holds (a diffusers
    pipeline has a model_index.json; anything else is loaded as a causal LM)."""
    if resolve_task(config) == "text_to_image":
        from worker.engines.image import build_image_engine

        if config.device_map is not None or config.tp_size > 1:
            raise ValueError("--device-map and --tp-size shard LLMs; a diffusers pipeline that does not fit uses "
                             "--cpu-offload")

        return build_image_engine(config)
    return build_llm_engine(config)


def resolve_task(config: WorkerConfig) -> str:
    if config.task != "auto":
        return config.task
    return "text_to_image" if (Path(config.model_path) / "model_index.json").is_file() else "generate"


def build_llm_engine(config: WorkerConfig):
    """The LLM engine, its model sharded when the config says so. Under tensor parallelism every rank builds
    it, in step (loading creates the process group; the StepChannel is made after it).

    Serve mode (--serve-mode): batched (the continuous batch), or sequential (one request at a time through
    the model's own generate, worker/engines/sequential.py). auto: batched; a --trust-remote-code model whose
    forward the batched engine cannot drive (its probe forward finds no attention-interface call, or a VLM
    without get_image_features / image_token_id) falls back to sequential. The choice is logged."""
    import torch

    from worker.models.loading import Sharding, is_remote_code, load_model

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    sharding = Sharding(device_map=config.device_map_value, max_memory=config.max_memory_caps,
                        offload_folder=config.offload_folder, tp_size=config.tp_size)
    model, tokenizer, image_processor = load_model(config.model_path, config.device, config.dtype,
                                                   config.trust_remote_code, sharding)
    if config.serve_mode == "sequential":
        log.info("serve mode sequential (--serve-mode sequential): one request at a time through the model's "
                 "own generate")
        return _sequential_engine(config, model, tokenizer, image_processor)
    attn_before = model.config._attn_implementation
    try:
        engine = _batched_engine(config, model, tokenizer, image_processor)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
        if config.serve_mode == "batched" or not is_remote_code(model) or config.tp_size > 1:
            raise
        log.warning("serve mode sequential: %s (remote code) cannot run in the batched engine (%s: %s); serving "
                    "one request at a time through its own generate", type(model).__name__, type(exc).__name__, exc)
        _restore_attention(model, attn_before)
        return _sequential_engine(config, model, tokenizer, image_processor)
    log.info("serve mode batched: %s in the continuous batch", type(model).__name__)
    return engine


def _batched_engine(config: WorkerConfig, model, tokenizer, image_processor):
    from worker.engines.llm import LLMEngine, LLMEngineConfig
    from worker.engines.vision import VisionModel
    from worker.models.loading import is_remote_code

    vision = None
    if image_processor is not None:  # a vision-language model: chat requests may carry images
        if is_remote_code(model) and not callable(getattr(model, "get_image_features", None)):
            raise AttributeError("a remote-code vision model without get_image_features: its images cannot be "
                                 "encoded apart from its forward")
        vision = VisionModel(model, tokenizer, image_processor, config.image_policy)
        log.info("vision model: chat requests may carry images")
    peers = None
    if config.tp_size > 1:
        from worker.engines.tensor_parallel import StepChannel

        peers = StepChannel()
    return LLMEngine(model, tokenizer, vision=vision, config=LLMEngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, max_tokens_limit=config.max_tokens_limit,
        max_cached_tokens=config.kv_cache_tokens, block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching, gpu_memory_utilization=config.gpu_memory_utilization,
        attention_backend=config.attention_backend,
        tool_parser=config.tool_parser,
    ), peers=peers)


def _sequential_engine(config: WorkerConfig, model, tokenizer, image_processor):
    from worker.engines.sequential import SequentialEngine, SequentialEngineConfig

    return SequentialEngine(model, tokenizer, image_processor, policy=config.image_policy,
                            config=SequentialEngineConfig(max_num_seqs=config.max_num_seqs,
                                                          max_model_len=config.max_model_len,
                                                          max_tokens_limit=config.max_tokens_limit,
                                                          tool_parser=config.tool_parser))


def _restore_attention(model, name: str | None) -> None:
    """Undo the batched engine's attention setting after it gave up on the model (its own generate runs next)."""
    try:
        model.set_attn_implementation(name or "eager")
    except (ValueError, ImportError) as exc:
        log.warning("cannot set the attention implementation back to %s: %s", name, exc)


def run_worker(config: WorkerConfig, burst: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.tp_size == 1:
        return _serve(build_worker(config), config, burst)
    from worker.engines.tensor_parallel import check_launch, follow

    check_launch(config.tp_size, os.environ.get("WORLD_SIZE"))
    engine = build_llm_engine(config)
    if not engine.peers.is_leader:  # a follower: no Redis, no requests; it runs the forwards rank 0 sends
        follow(engine, engine.peers)
        return 0
    try:
        return _serve(build_worker(config, engine), config, burst)
    finally:
        engine.peers.stop()


def _serve(worker, config: WorkerConfig, burst: bool) -> int:
    from worker.engines.tensor_parallel import RanksDiverged
    from worker.loop import EngineFailed

    worker.install_signal_handlers()
    if config.metrics_port is not None:
        from worker.metrics import WorkerMetrics

        worker.metrics = WorkerMetrics(worker)
        log.info("serving Prometheus metrics on port %d", worker.metrics.serve(config.metrics_port))
    log.info("worker %s serving %r from %s (max_num_seqs=%d, %s)", config.worker_id, config.model_name,
             config.model_path, config.max_num_seqs, _placement_text(worker.engine, config))
    try:
        worker.run(burst=burst)
    except (EngineFailed, RanksDiverged) as exc:
        log.error("worker %s stopped, its requests handed back: %s", config.worker_id, exc)
        return EXIT_ENGINE_FAILED
    log.info("worker %s stopped", config.worker_id)
    return 0


def _placement_text(engine, config: WorkerConfig) -> str:
    kv = getattr(engine, "kv", None)  # the LLM engine's paged cache; the image engine has none
    if kv is None:
        return f"device={config.device}"
    devices = ",".join(str(d) for d in kv.devices)
    if config.tp_size > 1:
        return f"tensor parallel x{config.tp_size}, rank 0 on {devices}"
    if config.device_map is not None:
        return f"layers on {devices}, logits on {engine.device}"
    return f"device={devices}"
