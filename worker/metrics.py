"""Prometheus metrics a worker serves on --metrics-port (prometheus-client).

The loop calls two hooks: `on_step(seconds, outputs)` after each engine step, and
`on_written(outbox, fenced)` once a Redis round has written an outbox, which counts every request whose
terminal event landed there, however it ended (finished, failed in a step, rejected at intake,
expired, aborted, dead-lettered); everything else is read at scrape time (queue depth and dead letters from Redis, KV use from the engine, reclaims from
the loop's stats), so the loop itself never waits on metrics. Each worker has its own registry.

TTFT is measured from the request's admission into this worker's engine to its first token
(the producer's clock is not this machine's); time per output token is the mean gap between the
first and the last token of a finished request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from producer.protocol import TERMINAL_EVENTS, ErrorCode, EventType
from worker.outbox import Outbox

log = logging.getLogger("redbatch.metrics")

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class WorkerMetrics:
    """The metrics of one worker; `serve(port)` exposes them over HTTP."""

    def __init__(self, worker: Any):
        self.worker = worker
        self.registry = CollectorRegistry()
        labels = {"model": worker.config.model_name}
        self._model = worker.config.model_name
        self.requests = Counter("redbatch_requests", "Requests this worker ended, by task and outcome "
                                "(done_<finish_reason>, aborted, or the error code)", ["model", "task", "outcome"],
                                registry=self.registry)
        self.dead_lettered = Counter("redbatch_dead_lettered", "Entries this worker copied to the dead letters",
                                     ["model"], registry=self.registry).labels(**labels)
        self.tokens = Counter("redbatch_generated_tokens", "Output tokens generated", ["model"],
                              registry=self.registry).labels(**labels)
        self.step_seconds = Histogram("redbatch_step_seconds", "Engine step latency", ["model"],
                                      buckets=_STEP_BUCKETS, registry=self.registry).labels(**labels)
        self.batch_size = Histogram("redbatch_batch_size", "Requests in one engine step", ["model"],
                                    buckets=_batch_buckets(worker.config.max_num_seqs),
                                    registry=self.registry).labels(**labels)
        self.ttft = Histogram("redbatch_time_to_first_token_seconds", "Admission to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=self.registry).labels(**labels)
        self.tpot = Histogram("redbatch_time_per_output_token_seconds", "Mean gap between output tokens", ["model"],
                              buckets=_TPOT_BUCKETS, registry=self.registry).labels(**labels)
        self.registry.register(_ScrapeTimeCollector(self))
        self._server = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint (a daemon thread); returns the port (useful with port 0)."""
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------ the loop's hook

    def on_step(self, seconds: float, outputs: list[Any]) -> None:
        self.step_seconds.observe(seconds)
        self.batch_size.observe(len(outputs))
        self.tokens.inc(sum(o.num_tokens for o in outputs))
        now = time.monotonic()
        for out in outputs:
            if out.error is not None or not out.is_finished:
                continue
            seq = out.seq
            if getattr(seq, "first_token_s", None) is not None and seq.num_resumed_tokens == 0:  # LLM requests
                self.ttft.observe(max(0.0, seq.first_token_s - seq.arrival_s))
                num_new = len(seq.output_ids) - 1
                if num_new > 0:
                    self.tpot.observe(max(0.0, now - seq.first_token_s) / num_new)


    def on_written(self, outbox: Outbox, fenced: set[str]) -> None:
        """Count the requests whose terminal event this outbox wrote (a fenced request's writes were refused:
        another worker owns it and will count it)."""
        for request_id, _seq, type, fields in outbox.events:
            if type not in TERMINAL_EVENTS or request_id in fenced:
                continue
            if type == EventType.DONE:
                outcome = f"done_{_reason(fields.get('finish_reason'))}"
            elif type == EventType.ABORTED:
                outcome = "aborted"
            else:
                outcome = _reason(fields.get("code", ErrorCode.MODEL_ERROR))
            task = outbox.tasks.get(request_id, "unknown")
            self.requests.labels(model=self._model, task=task, outcome=outcome).inc()
        if outbox.dead:
            self.dead_lettered.inc(len(outbox.dead))


class _ScrapeTimeCollector:
    """Gauges and counters read when Prometheus scrapes: Redis and engine state, the loop's stats."""

    def __init__(self, metrics: WorkerMetrics):
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # not known without a scrape; prometheus-client then calls collect() lazily

    def collect(self) -> Iterable[Any]:
        worker = self.metrics.worker
        model = worker.config.model_name
        yield _gauge("redbatch_active_requests", "Requests running in the engine", model, worker.engine.num_active)
        yield _gauge("redbatch_waiting_requests", "Requests admitted but not yet scheduled", model,
                     worker.engine.num_waiting)
        engine = worker.engine.metrics()
        blocks, free = engine.get("kv_blocks", 0), engine.get("kv_blocks_free", 0)
        yield _gauge("redbatch_kv_blocks", "KV cache blocks", model, blocks)
        yield _gauge("redbatch_kv_blocks_free", "Free KV cache blocks", model, free)
        yield _gauge("redbatch_kv_usage_ratio", "Share of KV cache blocks in use", model,
                     (blocks - free) / blocks if blocks else 0.0)
        reclaimed = CounterMetricFamily("redbatch_reclaimed", "Entries this worker reclaimed from dead workers",
                                        labels=["model"])
        reclaimed.add_metric([model], worker.stats.num_reclaimed)
        yield reclaimed
        try:
            streams = worker.streams
            pipe = streams.pipeline()
            for key in streams.request_keys.values():
                pipe.xlen(key)
            pipe.xlen(streams.keys.dead(model))
            *queues, dead = pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis away: the other metrics still answer
            log.warning("metrics: cannot read queue depth: %s", exc)
            return
        yield _gauge("redbatch_queue_depth", "Entries in the model's request streams (every priority level)", model,
                     sum(queues))
        by_level = GaugeMetricFamily("redbatch_queue_depth_by_priority", "Entries in the request stream of one "
                                     "priority level", labels=["model", "priority"])
        for level, queue in zip(streams.request_keys, queues):
            by_level.add_metric([model, level.value], queue)
        yield by_level
        yield _gauge("redbatch_dead_letters", "Entries in the model's dead-letter stream", model, dead)


def _gauge(name: str, documentation: str, model: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["model"])
    family.add_metric([model], value)
    return family


def _batch_buckets(max_num_seqs: int) -> tuple[float, ...]:
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(float(size))
        size *= 2
    return (*buckets, float(max_num_seqs))


def _reason(reason: Any) -> str:
    return getattr(reason, "value", None) or str(reason or "unknown")
