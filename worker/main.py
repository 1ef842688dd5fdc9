"""Building a worker from its config and running it."""

from __future__ import annotations

import logging
import os

from producer.connection import connect
from worker.config import WorkerConfig

log = logging.getLogger("redbatch.worker")
EXIT_ENGINE_FAILED = 75  # EX_TEMPFAIL: steps kept failing, the requests are handed back; restart the process


def build_engine(config: WorkerConfig, peers=None):
    """Load the model (sharded when the config says so) and build the LLM engine over it. Under tensor
    parallelism every rank calls this, in step, and passes its StepChannel as `peers` (None: the channel is
    made here, once loading has created the process group)."""
    import torch

    from worker.engines.llm import LLMEngine, LLMEngineConfig
    from worker.models.loading import Sharding, load_llm

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    sharding = Sharding(device_map=config.device_map, max_memory=config.max_memory,
                        offload_folder=config.offload_folder, tp_size=config.tp_size)
    model, tokenizer = load_llm(config.model_path, config.device, config.dtype, config.trust_remote_code, sharding)
    if config.tp_size > 1 and peers is None:
        from worker.engines.tensor_parallel import StepChannel

        peers = StepChannel()
    return LLMEngine(model, tokenizer, LLMEngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, max_tokens_limit=config.max_tokens_limit,
        max_cached_tokens=config.kv_cache_tokens, block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching, gpu_memory_utilization=config.gpu_memory_utilization,
        attention_backend=config.attention_backend,
        tool_parser=config.tool_parser,
    ), peers=peers)


def build_worker(config: WorkerConfig, engine=None):
    from worker.loop import Worker
    from worker.streams import WorkerStreams

    engine = engine if engine is not None else build_engine(config)
    client = connect(config.redis_url, health_check_interval=30)
    return Worker(config, engine, WorkerStreams(client, config))


def run_worker(config: WorkerConfig, burst: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.tp_size == 1:
        return _serve(build_worker(config), config, burst)
    from worker.engines.tensor_parallel import check_launch, follow

    check_launch(config.tp_size, os.environ.get("WORLD_SIZE"))
    engine = build_engine(config)
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
    devices = ",".join(str(d) for d in dict.fromkeys(engine.kv.layer_devices))
    if config.tp_size > 1:
        return f"tensor parallel x{config.tp_size}, rank 0 on {devices}"
    if config.device_map is not None:
        return f"layers on {devices}, logits on {engine.device}"
    return f"device={devices}"
