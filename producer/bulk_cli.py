"""`redbatch bulk ...`: submit, worker, resume, cancel, status of bulk jobs (producer.bulk)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

TERMINAL_RQ_STATES = ("finished", "failed", "canceled", "stopped")


def add_bulk_parser(sub, add_common) -> None:
    from producer.bulk import BULK_QUEUE, DEFAULT_RETRIES
    from producer.bulk.state import DEFAULT_LEASE_S
    from producer.keys import PRIORITIES, Priority

    bulk = sub.add_parser("bulk", help="offline bulk generation: OpenAI Batch JSONL in, JSONL out (an rq job)")
    cmds = bulk.add_subparsers(dest="bulk_command", required=True)

    s = cmds.add_parser("submit", help="enqueue a bulk job; prints its id as the last line")
    add_common(s)
    s.add_argument("input", help="OpenAI Batch JSONL file (a path the bulk worker can read)")
    s.add_argument("--model", required=True)
    s.add_argument("--output", required=True, help="output JSONL (a path the bulk worker can write)")
    s.add_argument("--max-in-flight", type=int, default=None,
                   help="requests enqueued at once (default: 2 x the live workers' max_num_seqs)")
    s.add_argument("--priority", default=Priority.BULK.value, choices=[p.value for p in PRIORITIES],
                   help="the request stream level its requests go to; interactive traffic is served before bulk, "
                        "bulk before background")
    s.add_argument("--queue", default=BULK_QUEUE, help="rq queue")
    s.add_argument("--serving-url", default=None,
                   help="the Redis the model's workers serve, when not --redis-url (rq's): e.g. a redis+cluster:// URL, "
                        "which rq itself cannot use")
    s.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="rq re-runs of a job that raised or whose worker died (rq Retry; an abandoned job is re-queued by the next bulk worker cleanup)")
    s.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S,
                   help="a dead runner's job can be resumed this long after it stopped renewing")

    w = cmds.add_parser("worker", help="run bulk jobs (rq's worker with the JSON serializer)")
    add_common(w)
    w.add_argument("--queue", action="append", default=None, help=f"rq queue (repeatable; default {BULK_QUEUE})")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    w.add_argument("--simple", action="store_true", help="run jobs in the worker process (no fork)")
    w.add_argument("--name", default=None)

    for name, what in (("resume", "queue a stopped job again; it continues where its output ends"),
                       ("cancel", "stop submitting and abort the job's requests in flight")):
        c = cmds.add_parser(name, help=what)
        add_common(c)
        c.add_argument("job_id")
        if name == "resume":
            c.add_argument("--wait-s", type=float, default=None,
                           help="wait this long for a dead runner's lease to expire (default: the job's lease)")

    st = cmds.add_parser("status", help="done/failed/total, tokens/s and ETA of a job")
    add_common(st)
    st.add_argument("job_id")
    st.add_argument("--follow", action="store_true", help="a live progress bar until the job stops")
    st.add_argument("--json", action="store_true")
    st.add_argument("--interval", type=float, default=1.0)


def run_bulk_command(args: argparse.Namespace, redis_url: str) -> int:
    from producer import bulk
    from producer.connection import connect

    try:
        bulk.check_rq_url(redis_url)
    except bulk.BulkError as exc:
        raise SystemExit(f"redbatch bulk: {exc}") from None
    with connect(redis_url) as rds:
        command = args.bulk_command
        if command == "submit":
            job = bulk.submit(args.input, model=args.model, output_path=args.output, connection=rds,
                              max_in_flight=args.max_in_flight, prefix=args.prefix, queue=args.queue,
                              retries=args.retries, lease_s=args.lease_s, priority=args.priority,
                              serving_url=args.serving_url)
            print(f"queued bulk job on {args.queue}; follow it with `redbatch bulk status --follow {job.id}`")
            print(job.id)
        elif command == "worker":
            bulk.run_worker(connection=rds, queues=args.queue, burst=args.burst, simple=args.simple, name=args.name)
        elif command == "resume":
            job = bulk.resume(args.job_id, connection=rds, wait_s=args.wait_s)
            print(f"job {job.id} is {job.get_status().value}")
        elif command == "cancel":
            print(bulk.cancel(args.job_id, connection=rds))
        elif args.follow:
            _follow(rds, args.job_id, args.interval)
        else:
            info = bulk.status(args.job_id, connection=rds)
            print(json.dumps(info, indent=2) if args.json else status_line(info))
    return 0


def status_line(info: dict[str, Any]) -> str:
    state = info.get("state", "waiting to start") if info["status"] == "started" else info["status"]
    if info["status"] == "finished":
        state = info.get("state", "finished")
    parts = [f"job {info['job_id']}: {state}"]
    if "total" in info:
        parts.append(f"done {info['done']}/{info['total']} (failed {info['failed']})")
        parts.append(f"in flight {info['in_flight']}")
        parts.append(f"{info['tokens_per_s']:.1f} tok/s")
        parts.append(f"ETA {_duration(info.get('eta_s'))}")
    if info.get("error"):
        parts.append(f"error: {' '.join(info['error'])}")
    return "  ".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _follow(rds, job_id: str, interval_s: float) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from producer import bulk

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[tps]} tok/s"),
               TextColumn("ETA {task.fields[eta]}"))
    with Progress(*columns) as bar:
        task = bar.add_task(job_id, total=None, failed=0, tps="0.0", eta="-")
        while True:
            info = bulk.status(job_id, connection=rds)
            bar.update(task, description=f"{job_id[:8]} {info.get('state', info['status'])}",
                       total=info.get("total"), completed=info.get("done", 0), failed=info.get("failed", 0),
                       tps=f"{info.get('tokens_per_s', 0.0):.1f}", eta=_duration(info.get("eta_s")))
            if info["status"] in TERMINAL_RQ_STATES:
                break
            time.sleep(interval_s)
    print(status_line(info))
