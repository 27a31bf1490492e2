"""How the CLI draws things on a terminal: the status table and the live display of `up`.

Everything here takes data the core computed and returns or prints rich renderables; nothing
here decides anything. Off a terminal (pipes, CI, `watch`) the same tables print without
colour, wide enough that each service stays on one line for grep and awk.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from mlx_stack.cli.lifecycle import LoadProgress, ServiceStatus
from mlx_stack.contract.snapshot import RemoteStatus
from mlx_stack.logfiles import printable

#: Wide enough for a status row with a long detail when the output is not a terminal.
PIPE_WIDTH = 240

STATE_STYLES = {
    "ready": "green",
    "starting": "yellow",
    "waiting": "yellow",
    "unhealthy": "yellow",
    "stopping": "yellow",
    "backoff": "red",
    "fatal": "bold red",
    "stopped": "dim",
    "reachable": "green",  # url: tiers (cli/endpoints.py)
    "failing": "red",
    "unreachable": "red",
}


def console(*, stderr: bool = False) -> Console:
    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal:
        con = Console(stderr=stderr, highlight=False, width=PIPE_WIDTH)
    return con


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MB"


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def status_table(rows: Sequence[ServiceStatus]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in [
        ("SERVICE", "left"),
        ("STATE", "left"),
        ("MODEL", "left"),
        ("PORT", "right"),
        ("PID", "right"),
        ("UPTIME", "right"),
        ("RSS", "right"),
        ("PROBE", "right"),
        ("RESTARTS", "right"),
    ]:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("DETAIL", overflow="fold")
    for r in rows:
        detail = r.detail or (f"last exit: {r.last_exit}" if r.last_exit else "")
        table.add_row(
            r.name,
            state_text(r.state),
            r.model or "-",
            str(r.port),
            str(r.pid or "-"),
            duration(r.uptime_s),
            mib(r.rss_bytes),
            "-" if r.probe_ms is None else f"{r.probe_ms:.0f} ms",
            str(r.restarts),
            detail,
        )
    return table


def remote_state(r: RemoteStatus) -> str:
    """One word for a remote: unchecked, unreachable, unauthorised, reachable."""
    if r.checked_at is None:
        return "unchecked"
    if not r.reachable:
        return "unreachable"
    if r.authorised is False:
        return "unauthorised"
    return "reachable" if r.authorised else "unknown"


REMOTE_STYLES = {"reachable": "green", "unchecked": "yellow", "unknown": "yellow",
                 "unreachable": "red", "unauthorised": "red"}


def remotes_table(remotes: Sequence[RemoteStatus]) -> Table:
    """Each remote stack: its state, latency, and each model's verdict (refused: why)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in [("REMOTE", "left"), ("STATE", "left"), ("URL", "left"),
                          ("LATENCY", "right"), ("MODELS", "left")]:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("DETAIL", overflow="fold")
    for r in remotes:
        state = remote_state(r)
        models = ", ".join(
            (m.name if m.joined == m.name else f"{m.name} as {m.joined}") + f" {m.verdict}"
            for m in r.models)
        details = [r.problem] if r.problem else []
        details += [f"{m.name}: {m.reason}" for m in r.models if m.verdict == "refused"]
        table.add_row(r.name, Text(state, style=REMOTE_STYLES.get(state, "")), r.url,
                      "-" if r.latency_ms is None else f"{r.latency_ms:.0f} ms", models,
                      "; ".join(details))
    return table


def models_table(rows: Sequence[dict[str, object]]) -> Table:
    """The catalog as `mlx-stack models` shows it (rows as its --json gives them)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in [("", "left"), ("MODEL", "left"), ("TYPE", "left"),
                          ("MEMORY", "right"), ("SIZE", "left"), ("QUANTS", "left")]:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        if "dimensions" in r:
            size = f"{r['dimensions']} dims, MTEB {r['mteb_score']}"
        elif "max_sequence_length" in r:
            size = f"{r['params_m']}M, {r['max_sequence_length']} tokens"
        else:
            size = f"{r['params_b']}B, {r['tier_hint']}"
        table.add_row(
            Text("*", style="green") if r["present"] else "",
            str(r["name"]),
            str(r["type"]),
            f"{r['memory_mb']:,} MB",
            size,
            ",".join(str(q) for q in r["quants"]),  # type: ignore[attr-defined]
        )
    return table


def fatal_logs(rows: Sequence[ServiceStatus], lines: int = 5) -> list[str]:
    """The last log lines of each service that gave up: the first thing a user needs to see."""
    out = []
    for r in rows:
        if r.state == "fatal" and r.last_exit_log:
            out.append(f"{r.name}: last lines of its log (`mlx-stack logs {r.name}` for more)")
            out += [f"  | {printable(line)}" for line in r.last_exit_log[-lines:]]
    return out


class LoadDisplay:
    """A live view of `up` / `restart` on a terminal: one line per service, updated as it loads.

    The bar is the service's memory against the size of its weights (see LoadProgress); it stops
    short of full until the service answers a real request, so a full bar always means ready.
    """

    def __init__(self, con: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.fields[name]:<12}"),
            TextColumn("{task.fields[state]}"),
            BarColumn(bar_width=28),
            TextColumn("{task.fields[memory]}"),
            TextColumn("{task.fields[elapsed]}", justify="right"),
            console=con,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> LoadDisplay:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def say(self, service: str, message: str) -> None:
        """Lines about things that are not a loading service (the supervisor, leftovers)."""
        if service not in self.tasks:
            self.progress.console.print(f"  {service:<12} {message}", highlight=False)

    def update(self, items: Sequence[LoadProgress]) -> None:
        for p in items:
            if p.name not in self.tasks:
                self.tasks[p.name] = self.progress.add_task(
                    "", total=None, name=p.name, state="", memory="", elapsed=""
                )
            task = self.tasks[p.name]
            if p.ready and self.progress.tasks[task].finished:
                continue  # keep the time it took to become ready
            style = STATE_STYLES.get(p.state, "")
            total = float(p.weights_bytes) if p.weights_bytes else None
            if p.ready:
                completed = total or 1.0
                total = total or 1.0
            elif total and p.rss_bytes:
                completed = min(float(p.rss_bytes), 0.99 * total)
            else:
                completed = 0.0
            memory = mib(p.rss_bytes) + (f" / weights {mib(p.weights_bytes)}"
                                         if p.weights_bytes else "")
            self.progress.update(
                task,
                total=total,
                completed=completed,
                state=f"[{style}]{p.state:<10}[/]" if style else f"{p.state:<10}",
                memory=memory,
                elapsed=f"{p.elapsed_s:5.1f} s",
            )
