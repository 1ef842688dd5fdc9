"""What the benchmark found: rows per workload, the peer sweep, the roofline, the targets; printed and as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.hf_cb import SweepPoint
from bench.roofline import TERMS, CostModel

console = Console(width=150)

NAMES = {
    "a": "(a) generate, one at a time",
    "b": "(b) static batches, sorted by length",
    "c": "(c) transformers continuous batching",
    "d": "(d) redbatch engine, in process",
    "e": "(e) redbatch worker via Redis",
}
PEERS = ("a", "b", "c")


@dataclass
class Row:
    contender: str  # a key of NAMES
    config: str = ""
    tokens: int = 0
    wall_s: float = math.nan
    same_tokens: str = "-"  # "matching/total" against sequential generate
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    error: str = ""  # the contender could not run
    warning: str = ""  # a peer slower than sequential: its configuration is wrong

    @property
    def name(self) -> str:
        return NAMES[self.contender]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s and not self.error else math.nan


@dataclass
class WorkloadResult:
    model: str  # "default" / "fast"
    workload: str  # "w1" ...
    title: str
    rows: list[Row]
    ideal_s: float | None = None
    sweep: list[SweepPoint] = field(default_factory=list)
    sweep_note: str = ""
    profile: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def row(self, contender: str) -> Row | None:
        return next((r for r in self.rows if r.contender == contender and not r.error), None)

    def best_peer(self) -> Row | None:
        peers = [r for r in self.rows if r.contender in PEERS and not r.error]
        return max(peers, key=lambda r: r.tok_s) if peers else None

    @property
    def invalid_peers(self) -> list[Row]:
        return [r for r in self.rows if r.warning]


def flag_misconfigured_peers(result: WorkloadResult) -> None:
    """A peer slower than one-at-a-time `generate` is mis-configured; say so loudly instead of beating it."""
    sequential = result.row("a")
    if sequential is None:
        return
    for row in result.rows:
        if row.contender in ("b", "c") and not row.error and row.tok_s < sequential.tok_s:
            row.warning = f"SLOWER THAN SEQUENTIAL ({row.tok_s:.1f} < {sequential.tok_s:.1f} tok/s): configuration bug"


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---------------------------------------------------------------- tables


def print_model_header(name: str, description: str, cost: CostModel) -> None:
    console.rule(f"[bold]model {name}: {description}")
    coefficients = ", ".join(f"{t} = {k:.3g}" for t, k in zip(TERMS, cost.coefficients))
    console.print(f"roofline cost model, cost_s = a + b·num_tokens + e·num_seqs + c·sum_kv + d·sum_pairs, fitted on "
                  f"{len(cost.points)} plain-HF forwards: {coefficients}")
    worst = "; ".join(f"B{b} q{q} past{p}: {s * 1e3:.1f} ms measured, {m * 1e3:.1f} modelled"
                      for b, q, p, s, m in cost.worst_points())
    console.print(f"  fit error: rms {cost.rms_rel_error:.1%}, max {cost.max_rel_error:.1%} (relative); worst: {worst}")


def print_offline(result: WorkloadResult) -> None:
    if result.sweep:
        _print_sweep(result)
    table = Table(title=f"{result.model} model: {result.title}")
    for col in ("contender", "configuration", "tokens", "wall s", "tok/s", "x sequential", "redbatch e2e / it",
                "same tokens as (a)", "ideal / wall"):
        table.add_column(col, justify="left" if col in ("contender", "configuration") else "right")
    sequential, e2e = result.row("a"), result.row("e")
    for row in result.rows:
        if row.error:
            table.add_row(row.name, row.config, "-", "-", "FAILED", "-", "-", "-", "-", style="red")
            table.add_row("", f"[red]{escape(row.error)}", *[""] * 7)
            continue
        x_seq = f"{row.tok_s / sequential.tok_s:.2f}" if sequential else "-"
        vs = "INVALID" if row.warning else (f"{e2e.tok_s / row.tok_s:.2f}" if e2e else "-")
        eff = f"{result.ideal_s / row.wall_s:.2f}" if result.ideal_s and row.contender in ("d", "e") else "-"
        table.add_row(row.name, row.config, str(row.tokens), f"{row.wall_s:.1f}", f"{row.tok_s:.1f}", x_seq, vs,
                      row.same_tokens, eff, style="bold red" if row.warning else None)
        if row.warning:
            table.add_row(f"[bold red]!!! {row.warning}", *[""] * 8)
    if result.ideal_s:
        tokens = (result.row("d") or result.rows[0]).tokens
        table.add_row("roofline ideal (zero-overhead FCFS schedule)", "same schedule knobs as (d)", str(tokens),
                      f"{result.ideal_s:.1f}", f"{tokens / result.ideal_s:.1f}", "-", "-", "-", "1.00")
    console.print(table)
    for note in result.notes:
        console.print(f"  note: {note}")
    _print_profile(result)


def _print_sweep(result: WorkloadResult) -> None:
    table = Table(title=f"{result.model} model: {result.workload.upper()} transformers CB sweep ({result.sweep_note})")
    for col in ("max_batch_tokens", "num_blocks", "page_size", "max_requests_per_batch", "block sharing", "tok/s", ""):
        table.add_column(col, justify="right")
    best = max((p.tok_s for p in result.sweep if p.tok_s is not None), default=None)
    for point in result.sweep:
        c = point.config
        status = escape(point.error) or ("<- best, reported" if point.tok_s == best else "")
        tok_s = "FAILED" if point.tok_s is None else f"{point.tok_s:.1f}"
        table.add_row(str(c.max_batch_tokens), str(c.num_blocks), str(c.page_size), str(c.max_requests_per_batch),
                      "on" if c.allow_block_sharing else "off", tok_s, status, style="red" if point.error else None)
    console.print(table)


def _print_profile(result: WorkloadResult) -> None:
    profile = result.profile
    if not profile:
        return
    seconds = {k: v for k, v in profile.items() if k.endswith("_s")}
    steps = profile.get("num_steps")
    parts = []
    if seconds:
        total = sum(seconds.values())
        parts.append(", ".join(f"{k[:-2]} {v:.2f} s ({v / total:.0%})" for k, v in seconds.items()))
    else:
        parts.append("the engine exposes no per-phase `profile`")
    if steps:
        wall = (result.row("d") or Row("d")).wall_s
        parts.append(f"{int(steps)} steps, {wall / steps * 1000:.1f} ms/step")
    parts += [f"{k} {int(v)}" for k, v in profile.items() if k.startswith("num_") and k != "num_steps"]
    console.print(f"  (d) profile: {'; '.join(parts)}")


def print_online(result: WorkloadResult) -> None:
    table = Table(title=f"{result.model} model: {result.title}")
    for col in ("contender", "configuration", "tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms",
                "same tokens as (a)"):
        table.add_column(col, justify="left" if col in ("contender", "configuration") else "right")
    for row in result.rows:
        if row.error:
            table.add_row(row.name, f"[red]{escape(row.error)}", "FAILED", *["-"] * 5, style="red")
            continue
        table.add_row(row.name, row.config, f"{row.tok_s:.1f}", f"{pct(row.ttft_s, .5):.2f}",
                      f"{pct(row.ttft_s, .99):.2f}", f"{pct(row.tpot_s, .5) * 1000:.0f}",
                      f"{pct(row.tpot_s, .99) * 1000:.0f}", row.same_tokens)
    console.print(table)
    for note in result.notes:
        console.print(f"  note: {note}")


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    measured: float | None
    target: str
    status: str  # pass / FAIL / INVALID / n/a


def _ratio_target(name: str, value: float | None, bound: float, invalid: str = "") -> Target:
    if invalid:
        return Target(name, value, f">= {bound}", f"INVALID ({invalid})")
    if value is None or math.isnan(value):
        return Target(name, None, f">= {bound}", "n/a")
    return Target(name, value, f">= {bound}", "pass" if value >= bound else "FAIL")


def targets(results: list[WorkloadResult]) -> list[Target]:
    out = []
    for r in results:
        tag = f"{r.workload.upper()} ({r.model})"
        d, e = r.row("d"), r.row("e")
        if r.workload in ("w1", "w3", "w4"):
            bound = 2.0 if r.workload == "w4" else 1.5
            peer = r.best_peer()
            invalid = ", ".join([f"{p.name[:3]} slower than sequential" for p in r.invalid_peers]
                                + [f"{p.name[:3]} failed" for p in r.rows if p.contender in PEERS and p.error])
            value = e.tok_s / peer.tok_s if e and peer else None
            peer_name = peer.name[:3] if peer else "-"
            out.append(_ratio_target(f"{tag} redbatch e2e / best tuned peer {peer_name}", value, bound, invalid))
            ideal = r.ideal_s
            if r.model == "fast":
                out.append(_ratio_target(f"{tag} e2e / in process", e.tok_s / d.tok_s if e and d else None, 0.97))
            out.append(_ratio_target(f"{tag} in process / roofline", ideal / d.wall_s if d and ideal else None, 0.85))
        elif r.workload == "w2":
            c = r.row("c")
            if e and c and e.ttft_s and c.ttft_s:
                mine, theirs = pct(e.ttft_s, .5), pct(c.ttft_s, .5)
                out.append(Target(f"{tag} p50 TTFT e2e vs transformers CB ({theirs:.2f} s)", mine,
                                  f"<= {theirs:.2f}", "pass" if mine <= theirs else "FAIL"))
            else:
                out.append(Target(f"{tag} p50 TTFT e2e <= transformers CB", None, "<= (c)", "n/a"))
    return out


def print_targets(rows: list[Target]) -> None:
    table = Table(title="Targets (one run on this machine; a benchmark, never a timed test)")
    for col in ("target", "measured", "wanted", "status"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for t in rows:
        style = {"pass": "green", "FAIL": "bold red"}.get(t.status, "yellow")
        table.add_row(t.name, "-" if t.measured is None else f"{t.measured:.3f}", t.target, t.status, style=style)
    console.print(table)


def as_json(results: list[WorkloadResult], target_rows: list[Target], costs: dict[str, CostModel]) -> dict:
    def row_dict(row: Row) -> dict:
        data = asdict(row)
        data.update(name=row.name, tok_s=None if math.isnan(row.tok_s) else row.tok_s)
        return data

    return {
        "workloads": [{**{k: v for k, v in asdict(r).items() if k not in ("rows", "sweep")},
                       "rows": [row_dict(row) for row in r.rows],
                       "sweep": [{**asdict(p.config), "tok_s": p.tok_s, "error": p.error} for p in r.sweep]}
                      for r in results],
        "targets": [asdict(t) for t in target_rows],
        "roofline": {name: {"terms": list(TERMS), "coefficients": c.coefficients, "rms_rel_error": c.rms_rel_error,
                            "max_rel_error": c.max_rel_error, "points_batch_q_past_s": c.points}
                     for name, c in costs.items()},
    }
