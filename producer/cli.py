"""`redbatch` command line. Thin: parse → config → run. Worker commands import torch lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys

from producer.errors import RedbatchError
from producer.keys import DEFAULT_PREFIX
from worker.cli_args import add_worker_arguments, config_from_args

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def _redis_url(args: argparse.Namespace) -> str:
    return args.redis_url or os.environ.get("REDBATCH_REDIS_URL") or DEFAULT_REDIS_URL


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="redis:// or rediss:// URL (env REDBATCH_REDIS_URL)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redbatch", description="Redis-Streams worker pool for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="serve one model from its request stream")
    _add_common(w)
    add_worker_arguments(w)  # one flag per WorkerConfig field, with its default and help
    w.add_argument("--burst", action="store_true", help="exit once the stream is empty and nothing runs")
    w.add_argument("--health", action="store_true",
                   help="probe, do not serve: exit 0 if the worker's loop turned within --health-max-age-s (liveness)")
    w.add_argument("--ready", action="store_true",
                   help="probe, do not serve: exit 0 if it also heartbeated to Redis recently and is not draining")
    w.add_argument("--health-max-age-s", type=float, default=30.0)

    for name in ("generate", "chat"):
        g = sub.add_parser(name, help=f"send one {name} request and stream the answer")
        _add_common(g)
        g.add_argument("model")
        g.add_argument("text", help="prompt (generate) or user message (chat)")
        g.add_argument("--max-tokens", type=int, default=64)
        g.add_argument("--temperature", type=float, default=0.0)
        g.add_argument("--request-id", default=None)
        g.add_argument("--timeout-s", type=float, default=300.0)
        g.add_argument("--json", action="store_true", help="print the whole completion as JSON")

    a = sub.add_parser("abort", help="abort a queued or running request")
    _add_common(a)
    a.add_argument("model")
    a.add_argument("request_id")

    dl = sub.add_parser("dead", help="list, requeue or purge a model's dead letters")
    _add_common(dl)
    dl.add_argument("action", choices=["list", "requeue", "purge"])
    dl.add_argument("model")
    dl.add_argument("ids", nargs="*", help="requeue only these dead-letter ids")

    st = sub.add_parser("status", help="each model's queue, pending, lag, dead letters and workers (live or stale)")
    _add_common(st)
    st.add_argument("--json", action="store_true", help="print the status as one JSON object")

    tp = sub.add_parser("top", help="live terminal dashboard of the models and their workers")
    _add_common(tp)
    tp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    tp.add_argument("--iterations", type=int, default=None, help="stop after this many frames")
    tp.add_argument("--once", action="store_true", help="print one frame and exit (same as --iterations 1)")

    _add_bulk(sub)
    _add_gateway(sub)

    acl = sub.add_parser("acl", help="print a minimal Redis ACL file line for a role")
    acl.add_argument("role", choices=["producer", "worker", "bulk", "gateway"])
    acl.add_argument("--username", default=None)
    acl.add_argument("--password", required=True)
    acl.add_argument("--prefix", default=DEFAULT_PREFIX)

    t = sub.add_parser("make-tiny-model", help="build a tiny random-weight model + tokenizer offline")
    t.add_argument("out_dir")
    t.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    t.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("demo", help="embedded Redis + a tiny trained model's worker + concurrent streamed chats beside a top panel")
    _add_common(d)
    d.add_argument("--num-requests", type=int, default=24)
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--max-num-seqs", type=int, default=8)
    d.add_argument("--threads", type=int, default=2)
    return parser


def _add_gateway(sub) -> None:
    gw = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway (and Xinference's client endpoints)")
    _add_common(gw)
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--api-key", action="append", default=[], metavar="KEY[=MODEL,...]",
                    help="accept this Bearer key (for the listed models only); repeatable. No key: no authentication")
    gw.add_argument("--api-keys-file", default=os.environ.get("REDBATCH_GATEWAY_API_KEYS_FILE"),
                    help='JSON {"KEY": ["model", ...] or "*"} (env REDBATCH_GATEWAY_API_KEYS_FILE)')
    gw.add_argument("--event-readers", type=int, default=1, help="shared XREAD loops for all open requests")
    gw.add_argument("--request-timeout-s", type=float, default=600.0,
                    help="longest wait for a request's next event; then 504 and the request is aborted")
    gw.add_argument("--max-queue-wait-s", type=float, default=None,
                    help="default deadline: a request no worker started within this is answered 504")
    gw.add_argument("--retry-after-s", type=int, default=1, help="Retry-After of a 429 (queue full) or 503")
    gw.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, open requests get this long to finish")
    gw.add_argument("--no-status-page", action="store_true", help="serve no status page at / and /status.json")
    gw.add_argument("--log-level", default="info")


def _add_bulk(sub) -> None:
    from producer.bulk_cli import add_bulk_parser

    add_bulk_parser(sub, _add_common)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except RedbatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _cmd_worker(args: argparse.Namespace) -> int:
    if args.health or args.ready:
        return _probe_worker(args)
    if not args.model_name or not args.model_path:
        print("error: redbatch worker needs --model-name and --model-path", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
    from pydantic import ValidationError

    from worker.main import run_worker

    try:
        config = config_from_args(args, redis_url=_redis_url(args))
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_worker(config, burst=args.burst)


def _probe_worker(args: argparse.Namespace) -> int:
    """Liveness / readiness of a worker on this machine, from its health file (no Redis, no torch)."""
    from worker.health import check

    if not args.health_file:
        print("error: --health / --ready need --health-file (or REDBATCH_HEALTH_FILE)", file=sys.stderr)
        return 2
    ok, why = check(args.health_file, ready=args.ready, max_age_s=args.health_max_age_s)
    print(("ok: " if ok else "not ok: ") + why)
    return 0 if ok else 1


def _cmd_request(args: argparse.Namespace) -> int:
    from producer.client import Client

    client = Client(_redis_url(args), prefix=args.prefix)
    try:
        return _print_request(args, client.get_model(args.model))
    finally:
        client.redis.close()


def _print_request(args: argparse.Namespace, model) -> int:
    config = {"max_tokens": args.max_tokens, "temperature": args.temperature, "stream": not args.json}
    if args.request_id:
        config["request_id"] = args.request_id
    if args.command == "chat":
        result = model.chat([{"role": "user", "content": args.text}], generate_config=config, timeout_s=args.timeout_s)
    else:
        result = model.generate(args.text, generate_config=config, timeout_s=args.timeout_s)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for chunk in result:
        choice = chunk["choices"][0]
        piece = choice.get("text") if "text" in choice else choice["delta"].get("content", "")
        print(piece or "", end="", flush=True)
    print()
    return 0


def _cmd_abort(args: argparse.Namespace) -> int:
    from producer.client import Client

    client = Client(_redis_url(args), prefix=args.prefix)
    try:
        was_running = client.abort_request(args.model, args.request_id)
    finally:
        client.redis.close()
    print("abort requested" if was_running else "already finished: nothing to abort")
    return 0


def _cmd_dead(args: argparse.Namespace) -> int:
    from producer.connection import connect

    from producer import admin
    from producer.keys import Keys

    keys = Keys(args.prefix)
    with connect(_redis_url(args)) as client:
        if args.action == "list":
            letters = admin.list_dead(client, keys, args.model)
            for letter in letters:
                print(letter.summary())
            print(f"{len(letters)} dead letters")
        elif args.action == "requeue":
            print(f"requeued {admin.requeue_dead(client, keys, args.model, args.ids or None)}")
        else:
            print(f"purged {admin.purge_dead(client, keys, args.model)}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from producer.connection import connect

    from producer import admin
    from producer.keys import Keys

    with connect(_redis_url(args)) as client:
        status = admin.system_status(client, Keys(args.prefix))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        from rich.console import Console

        from producer.dashboard import render_status

        Console().print(render_status(status))
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    import time

    from producer.connection import connect
    from rich.console import Console
    from rich.live import Live

    from producer import admin
    from producer.dashboard import render_status, with_rates
    from producer.keys import Keys

    iterations = 1 if args.once else args.iterations
    keys, console = Keys(args.prefix), Console()
    with connect(_redis_url(args)) as client:
        status = admin.system_status(client, keys)
        if iterations == 1:
            console.print(render_status(status))
            return 0
        with Live(render_status(status), console=console, auto_refresh=False) as live:
            frames = 1
            while iterations is None or frames < iterations:
                time.sleep(args.interval)
                status = with_rates(admin.system_status(client, keys), status)
                live.update(render_status(status), refresh=True)
                frames += 1
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    try:
        from producer.gateway.config import GatewayConfig, load_api_keys
        from producer.gateway.serve import run_gateway
    except ImportError as exc:
        print(f"error: the gateway needs its extra: pip install 'redbatch[gateway]' ({exc})", file=sys.stderr)
        return 2
    config = GatewayConfig(
        redis_url=_redis_url(args), prefix=args.prefix, host=args.host, port=args.port,
        api_keys=load_api_keys(args.api_key, args.api_keys_file), num_event_readers=args.event_readers,
        request_timeout_s=args.request_timeout_s, max_queue_wait_s=args.max_queue_wait_s,
        retry_after_s=args.retry_after_s, grace_s=args.grace_s, status_page=not args.no_status_page)
    return run_gateway(config, log_level=args.log_level)


def _cmd_bulk(args: argparse.Namespace) -> int:
    from producer.bulk_cli import run_bulk_command

    return run_bulk_command(args, _redis_url(args))


def _cmd_acl(args: argparse.Namespace) -> int:
    from producer.acl import acl_file_line
    from producer.keys import Keys

    print(acl_file_line(Keys(args.prefix), args.role, args.username or f"rb-{args.role}", args.password))
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from worker.models.tiny import make_tiny_model

    print(make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from worker.demo import run_demo

    from pathlib import Path

    home = Path(os.environ.get("REDBATCH_HOME", Path.home() / ".cache" / "redbatch"))
    return run_demo(args.redis_url or os.environ.get("REDBATCH_REDIS_URL"), args.num_requests, args.max_tokens,
                    args.max_num_seqs, args.threads, home)


_COMMANDS = {
    "worker": _cmd_worker, "generate": _cmd_request, "chat": _cmd_request, "abort": _cmd_abort,
    "make-tiny-model": _cmd_make_tiny_model, "demo": _cmd_demo, "dead": _cmd_dead, "acl": _cmd_acl,
    "status": _cmd_status, "top": _cmd_top, "bulk": _cmd_bulk, "gateway": _cmd_gateway,
}

if __name__ == "__main__":
    sys.exit(main())
