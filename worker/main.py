"""Building a worker from its config and running it."""

from __future__ import annotations

import logging
from pathlib import Path

from producer.connection import connect
from worker.config import WorkerConfig

log = logging.getLogger("redbatch.worker")
EXIT_ENGINE_FAILED = 75  # EX_TEMPFAIL: steps kept failing, the requests are handed back; restart the process


def build_worker(config: WorkerConfig):
    import torch

    from worker.loop import Worker
    from worker.streams import WorkerStreams

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    engine = build_engine(config)
    client = connect(config.redis_url, health_check_interval=30)
    return Worker(config, engine, WorkerStreams(client, config))


def build_engine(config: WorkerConfig):
    """The engine for the worker's task: --task, or what the model directory holds (a diffusers
    pipeline has a model_index.json; anything else is loaded as a causal LM)."""
    if resolve_task(config) == "text_to_image":
        from worker.engines.image import build_image_engine

        return build_image_engine(config)
    return build_llm_engine(config)


def resolve_task(config: WorkerConfig) -> str:
    if config.task != "auto":
        return config.task
    return "text_to_image" if (Path(config.model_path) / "model_index.json").is_file() else "generate"


def build_llm_engine(config: WorkerConfig):
    from worker.engines.llm import LLMEngine, LLMEngineConfig
    from worker.models.loading import load_llm

    model, tokenizer = load_llm(config.model_path, config.device, config.dtype, config.trust_remote_code)
    return LLMEngine(model, tokenizer, LLMEngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, max_tokens_limit=config.max_tokens_limit,
        max_cached_tokens=config.kv_cache_tokens, block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching, gpu_memory_utilization=config.gpu_memory_utilization,
        attention_backend=config.attention_backend,
        tool_parser=config.tool_parser,
    ))


def run_worker(config: WorkerConfig, burst: bool = False) -> int:
    from worker.loop import EngineFailed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = build_worker(config)
    worker.install_signal_handlers()
    if config.metrics_port is not None:
        from worker.metrics import WorkerMetrics

        worker.metrics = WorkerMetrics(worker)
        log.info("serving Prometheus metrics on port %d", worker.metrics.serve(config.metrics_port))
    log.info("worker %s serving %r from %s (max_num_seqs=%d, device=%s)", config.worker_id, config.model_name,
             config.model_path, config.max_num_seqs, config.device)
    try:
        worker.run(burst=burst)
    except EngineFailed as exc:
        log.error("worker %s stopped, its requests handed back: %s", config.worker_id, exc)
        return EXIT_ENGINE_FAILED
    log.info("worker %s stopped", config.worker_id)
    return 0
