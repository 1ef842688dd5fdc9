"""bench/gateway.py's figures: one row per path and concurrency, printed as markdown tables."""

from __future__ import annotations

from collections import Counter

from producer.gateway.service import CLIENT_NAME, READER_CLIENT_NAME

DIRECT_CLIENT_NAME = "rb-bench-direct"
LABELS = {"direct": "direct: producer AsyncClient", "openai": "gateway: openai SDK", "httpx": "gateway: httpx SSE"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def summarize(runs: list, reference: list | None) -> dict:
    """One path at one concurrency over its rounds: latencies in ms, CPU per 1,000 tokens, peak connections."""
    failed = [s for run in runs for s in run.streams if s.error]
    streams = [s for run in runs for s in run.streams if not s.error]
    ttft = [s.ttft_s for s in streams if s.ttft_s is not None]
    gaps = [g for s in streams for g in s.gaps_s]
    tokens = sum(run.tokens for run in runs)
    wall = sum(run.wall_s for run in runs)
    cpu = Counter()
    for run in runs:
        cpu.update(run.cpu_s)
    peak = Counter()
    for run in runs:
        peak |= Counter(run.connections)
    same = None
    if reference is not None:
        texts = ["".join(s.text) for s in reference[0].streams]
        same = sum(not s.error and "".join(s.text) == t for s, t in zip(runs[0].streams, texts))
    return {
        "path": runs[0].path, "concurrency": runs[0].concurrency, "rounds": len(runs), "streams": len(streams),
        "failed_streams": len(failed), "errors": sorted({s.error for s in failed})[:3],
        "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 2), "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 2),
        "itl_p50_ms": round(percentile(gaps, 50) * 1e3, 2), "itl_p99_ms": round(percentile(gaps, 99) * 1e3, 2),
        "cpu_s_per_1k_tokens": {k: round(v / tokens * 1000, 4) for k, v in cpu.items()},
        "gateway_cores": round(cpu["gateway"] / wall, 2),
        "redis_connections": {"gateway_commands": peak[CLIENT_NAME], "gateway_events": peak[READER_CLIENT_NAME],
                              "direct_client": peak[DIRECT_CLIENT_NAME]},
        "same_text_as_direct": same,
    }


COLUMNS = ("path", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "gateway CPU s/1k tok",
           "client CPU s/1k tok", "Redis conns (peak)", "same text as direct",
           "failed streams")


def table_lines(rows: list[dict]) -> list[str]:
    """One markdown table per concurrency: each path, then what the gateway added to the direct path."""
    lines = []
    for n in dict.fromkeys(r["concurrency"] for r in rows):
        group = [r for r in rows if r["concurrency"] == n]
        direct = group[0]
        title = f"## {n} concurrent streams x {direct['tokens'] // direct['streams']} tokens, {direct['rounds']} round(s)"
        lines += [title, "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += [_row(r) for r in group]
        lines += [_added(r, direct) for r in group[1:]]
    return lines


def _row(r: dict) -> str:
    conns = r["redis_connections"]
    if r["path"] == "direct":
        held, gateway_cpu = f"{conns['direct_client']} (the client's)", "-"
    else:
        held = f"{conns['gateway_commands'] + conns['gateway_events']} ({conns['gateway_commands']} commands + " \
               f"{conns['gateway_events']} events)"
        gateway_cpu = f"{r['cpu_s_per_1k_tokens']['gateway']:.3f} ({r['gateway_cores']:.2f} cores)"
    same = "-" if r["same_text_as_direct"] is None else f"{r['same_text_as_direct']}/{r['concurrency']}"
    cells = (LABELS[r["path"]], f"{r['tok_s']:.0f}", f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p99_ms']:.1f}",
             f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}", gateway_cpu,
             f"{r['cpu_s_per_1k_tokens']['client']:.3f}", held, same, str(r["failed_streams"]))
    return "| " + " | ".join(cells) + " |"


def _added(r: dict, direct: dict) -> str:
    def plus(key: str) -> str:
        return f"{r[key] - direct[key]:+.1f}"

    cells = (f"added by the gateway ({r['path']})", f"{r['tok_s'] / direct['tok_s']:.2f}x",
             plus("ttft_p50_ms"), plus("ttft_p99_ms"), plus("itl_p50_ms"), plus("itl_p99_ms"), "", "", "", "", "")
    return "| " + " | ".join(cells) + " |"


def cpu_lines(rows: list[dict]) -> list[str]:
    lines = [f"failed streams, {r['concurrency']} streams, {r['path']}: {r['failed_streams']}: {'; '.join(r['errors'])}"
             for r in rows if r["failed_streams"]]
    lines += [f"CPU s per 1k tokens, {r['concurrency']} streams, {r['path']}: " + ", ".join(
        f"{name} {v:.3f}" for name, v in sorted(r["cpu_s_per_1k_tokens"].items())) for r in rows]
    for r in rows:
        per_token_s = r["cpu_s_per_1k_tokens"]["gateway"] / 1000
        if r["path"] != "direct" and per_token_s > 0:
            lines.append(f"gateway at {r['concurrency']} streams ({r['path']}): {per_token_s * 1e6:.0f} us CPU per "
                         f"streamed token, i.e. one core streams ~{1 / per_token_s:,.0f} tokens/s")
    return lines
