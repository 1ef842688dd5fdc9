"""Rendering of `redbatch status` / `redbatch top` (rich). The numbers come from producer.admin.system_status."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


def with_rates(status: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Replace each worker's since-start rates by the rates between `previous` and `status` where both saw it."""
    if previous is None:
        return status
    seconds = (status["ts"] - previous["ts"]) / 1000
    if seconds <= 0:
        return status
    before = {(m, w["worker_id"]): w for m, info in previous["models"].items() for w in info["workers"]}
    for model, info in status["models"].items():
        for worker in info["workers"]:
            old = before.get((model, worker["worker_id"]))
            if old is not None and "steps" in worker and "steps" in old:
                worker["steps_per_s"] = round((worker["steps"] - old["steps"]) / seconds, 2)
                worker["tokens_per_s"] = round((worker.get("tokens", 0) - old.get("tokens", 0)) / seconds, 2)
    return status


def render_status(status: dict[str, Any]) -> Group:
    parts: list[Any] = []
    if not status["models"]:
        parts.append(Text("no model registered"))
    for model, info in status["models"].items():
        lag = "?" if info["lag"] is None else str(info["lag"])
        live = (Text(f"{info['live_workers']} live worker(s)", style="green") if info["has_live_worker"]
                else Text("NO LIVE WORKER", style="bold red"))
        head = Text.assemble((model, "bold"), f"  queue {info['queue_len']}{_by_level(info)}  pending {info['pending']}  "
                             f"lag {lag}  dead {info['dead_letters']}  ", live)
        parts.append(head)
        table = Table(show_edge=False, pad_edge=False)
        for column in ("worker", "state", "active", "waiting", "steps/s", "tokens/s", "step ms", "KV use", "uptime"):
            table.add_column(column, justify="left" if column in ("worker", "state") else "right")
        for w in info["workers"]:
            state = Text("live", style="green") if w["live"] else Text(f"stale ({w['heartbeat_age_s']:.0f}s)", style="red")
            if w["live"] and w.get("draining"):
                state = Text("draining", style="yellow")
            kv = "-" if w["kv_used"] is None else f"{w['kv_used'] * 100:.0f}%"
            slots = f"/{w['max_num_seqs']}" if "max_num_seqs" in w else ""
            table.add_row(w["worker_id"], state, f"{w.get('active', 0)}{slots}", str(w.get("waiting", 0)),
                          f"{w['steps_per_s']:.1f}", f"{w['tokens_per_s']:.1f}", f"{w['step_ms']:.1f}", kv,
                          _duration(w["uptime_s"]))
        parts.append(table)
    return Group(*parts)


def _by_level(info: dict[str, Any]) -> str:
    """The queue per priority level, e.g. ` (interactive 2, bulk 950)`; nothing while only the default level has work."""
    levels = info.get("priorities") or {}
    shown = [(name, q["queue_len"] + q["pending"]) for i, (name, q) in enumerate(levels.items())
             if i == 0 or q["queue_len"] or q["pending"]]
    if len(shown) <= 1:
        return ""
    return " (" + ", ".join(f"{name} {levels[name]['queue_len']}" for name, _ in shown) + ")"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
