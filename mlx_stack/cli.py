"""The `mlx-stack` command: parse arguments, call the core, render. No logic of its own."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from mlx_stack import __version__, embedding_record, lifecycle, logs
from mlx_stack.catalog import (
    Catalog,
    CatalogEntry,
    ChatModel,
    EmbeddingModel,
    ModelType,
    load_catalog,
)
from mlx_stack.errors import MlxStackError
from mlx_stack.hardware import detect
from mlx_stack.paths import StatePaths
from mlx_stack.proxykey import ensure_key, read_key
from mlx_stack.stackfile import EMBEDDINGS_MODEL_NAME, Stack, load_stack

F = TypeVar("F", bound=Callable[..., Any])
SERVICES_HELP = "a chat tier name, 'embeddings' or 'proxy'"


def _friendly(fn: F) -> F:
    """Turn our errors into a message and an exit code; never show a traceback for them."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MlxStackError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _context() -> tuple[StatePaths, Catalog]:
    paths = StatePaths.from_env()
    return paths, load_catalog(paths.user_catalog)


def _load(paths: StatePaths, catalog: Catalog) -> Stack:
    return load_stack(paths.stack_file, catalog, detect().system)


def _say(service: str, message: str) -> None:
    click.echo(f"  {service:<12} {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-stack")
def main() -> None:
    """Run a local multi-model LLM stack: chat tiers, an embeddings server, a LiteLLM proxy.

    The state folder is ~/.mlx-stack (set MLX_STACK_HOME to move it).
    """


@main.command()
@click.option("--with-embeddings", is_flag=True, help="Add an embeddings tier (port 8003).")
@click.option(
    "--add-embeddings",
    "add_model",
    metavar="MODEL",
    help="Add an embeddings tier with MODEL to an existing stack file.",
)
@click.option("--force", is_flag=True, help="Replace an existing stack file (or embeddings tier).")
@click.option("--pull", is_flag=True, help="Download the recommended models first (needs network).")
@click.option(
    "--exist-ok", is_flag=True, help="Leave an existing stack file as it is (for scripts)."
)
@_friendly
def init(
    with_embeddings: bool, add_model: str | None, force: bool, pull: bool, exist_ok: bool
) -> None:
    """Write the stack file for this machine (and the proxy key)."""
    from mlx_stack import stackinit

    paths, catalog = _context()
    hw = detect()
    if exist_ok and not force and not add_model and paths.stack_file.exists():
        click.echo(f"{paths.stack_file} exists; left as it is")
        key_file = stackinit.key_file_of(paths, catalog, hw)
        if ensure_key(key_file):
            click.echo(f"created the missing proxy key in {key_file} (mode 0600)")
        return
    if add_model:
        res = stackinit.add_embeddings(paths, catalog, hw, add_model, force=force)
    else:
        puller = None
        if pull:
            from mlx_stack.sources import pull as do_pull

            def puller(entry: CatalogEntry, quant: str) -> Any:
                click.echo(f"pulling {entry.name} ({quant})", err=True)
                return do_pull(entry.quant(quant).sources)

        res = stackinit.init_stack(
            paths, catalog, hw, with_embeddings=with_embeddings, force=force, pull=puller
        )
    click.echo(f"wrote {res.path} ({hw.summary})")
    warning = embedding_record.mismatch(
        paths, embedding_record.current_identity(paths, res.stack.embeddings))
    if warning:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    for t in res.stack.tiers:
        click.echo(f"  tier {t.name:<10} {t.model.name} ({t.quant}) on port {t.port}")
    if res.stack.embeddings:
        e = res.stack.embeddings
        click.echo(
            f"  embeddings      {e.model.name} ({e.quant}) on port {e.port}, "
            f"as model '{EMBEDDINGS_MODEL_NAME}'"
        )
    for tier, entry in res.missing:
        click.echo(f"  not downloaded: {tier}: {entry.name}; run `mlx-stack pull {entry.name}`")
    if res.key_created:
        click.echo(f"created the proxy key in {res.key_file} (mode 0600); `mlx-stack key` shows it")
    click.echo("next: mlx-stack up")


@main.command()
@click.option(
    "--tier", metavar="NAME", help="Start only this model server (a tier or 'embeddings')."
)
@click.option(
    "--foreground",
    is_flag=True,
    help="Run the supervisor in this process (for launchd and systemd).",
)
@_friendly
def up(tier: str | None, foreground: bool) -> None:
    """Start the stack under its supervisor; return when every service answers real requests."""
    paths, catalog = _context()
    stack = _load(paths, catalog)
    if foreground:
        sys.exit(lifecycle.run_foreground(stack, paths, tier))
    ident = embedding_record.current_identity(paths, stack.embeddings)
    warning = embedding_record.mismatch(paths, ident)
    if warning:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    lifecycle.up(stack, paths, tier=tier, report=_say)
    if ident is not None and tier in (None, "embeddings"):
        embedding_record.record(paths, ident)
    p = stack.proxy
    host = "127.0.0.1" if p.host in ("0.0.0.0", "::") else p.host
    names = [t.name for t in stack.tiers] + ([EMBEDDINGS_MODEL_NAME] if stack.embeddings else [])
    if tier is None:
        click.echo(f"stack is up: http://{host}:{p.port}/v1 serves {', '.join(names)}")
        click.echo("  the key: `mlx-stack key`; state: `mlx-stack status`")
    else:
        click.echo(f"{tier} is up")


@main.command()
@click.option("--tier", metavar="NAME", help=f"Stop only this service ({SERVICES_HELP}).")
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for the stack to stop before killing the supervisor.",
)
@_friendly
def down(tier: str | None, timeout: float) -> None:
    """Stop the proxy, then every model server (whole process groups), then the supervisor."""
    paths = StatePaths.from_env()
    stopped = lifecycle.down(paths, tier=tier, report=_say, timeout_s=timeout)
    click.echo(f"stopped {len(stopped)} service(s)" if stopped else "nothing was running")


@main.command()
@click.argument("service", required=False)
@_friendly
def restart(service: str | None) -> None:
    """Restart SERVICE (or every service); this also clears a `fatal` state."""
    paths = StatePaths.from_env()
    lifecycle.restart(paths, service, report=_say)
    click.echo(f"{service or 'the stack'} is ready")


def _fmt_uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/status.md).")
@_friendly
def status(as_json: bool) -> None:
    """Show every service: state, model, port, pid, uptime, restarts, last exit."""
    paths, catalog = _context()
    plan, problem, warnings = None, "", []
    try:
        stack = _load(paths, catalog)
        warning = embedding_record.mismatch(
            paths, embedding_record.current_identity(paths, stack.embeddings))
        warnings += [warning] if warning else []
        plan = lifecycle.plan_for(stack, paths)
    except MlxStackError as exc:
        problem = str(exc)
    problem = lifecycle.stack_problem(paths) or problem
    rows = lifecycle.status(paths, plan)
    if as_json:
        body = {
            "stack_file": str(paths.stack_file),
            "problem": problem or None,
            "warnings": warnings,
            "services": [r.to_json() for r in rows],
        }
        click.echo(json.dumps(body, indent=2))
        return
    if problem:
        click.secho(f"stack file: {problem}", fg="yellow", err=True)
    for w in warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    click.echo(
        f"{'SERVICE':<12} {'STATE':<10} {'MODEL':<26} {'PORT':>5} {'PID':>7} "
        f"{'UPTIME':>8} {'RSS':>7} {'RESTARTS':>8}  DETAIL"
    )
    colours = {
        "ready": "green",
        "starting": "yellow",
        "unhealthy": "yellow",
        "backoff": "red",
        "fatal": "red",
        "stopping": "yellow",
    }
    for r in rows:
        state = click.style(f"{r.state:<10}", fg=colours.get(r.state))
        rss = f"{r.rss_bytes / 2**20:.0f}M" if r.rss_bytes else "-"
        detail = r.detail or (f"last exit: {r.last_exit}" if r.last_exit else "")
        click.echo(
            f"{r.name:<12} {state} {(r.model or '-'):<26} {r.port:>5} "
            f"{(r.pid or '-')!s:>7} {_fmt_uptime(r.uptime_s):>8} {rss:>7} "
            f"{r.restarts:>8}  {detail}"
        )
        if r.state == "fatal" and r.last_exit_log:
            for line in r.last_exit_log[-5:]:
                click.echo(f"{'':<12} | {line}")


@main.command("logs")
@click.argument("service")
@click.option("-n", "lines", default=50, show_default=True, help="How many lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option(
    "--all", "all_files", is_flag=True, help="Read the rotated backups too, oldest first."
)
@_friendly
def logs_cmd(service: str, lines: int, follow: bool, all_files: bool) -> None:
    """Show a service's log (a tier name, 'embeddings', 'proxy' or 'supervisor')."""
    paths = StatePaths.from_env()
    path = paths.log_file(service)
    if not path.exists() and not follow:
        known = sorted(p.stem for p in paths.logs.glob("*.log")) if paths.logs.exists() else []
        raise MlxStackError(
            f"no log for {service!r} at {path}; logs exist for: {', '.join(known) or 'nothing yet'}"
        )
    if all_files:
        from mlx_stack.logsink import all_log_files

        for f in all_log_files(path):
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    click.echo(line.rstrip("\n"))
    else:
        for line in logs.tail(path, lines):
            click.echo(line)
    if follow:
        for line in logs.follow(path):
            click.echo(line)


@main.command()
@click.option("--type", "kind", type=click.Choice(["chat", "embedding"]), help="Only this type.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def models(kind: str | None, as_json: bool) -> None:
    """List the model catalog."""
    from mlx_stack.sources import locate_first

    _, catalog = _context()
    entries = [e for e in catalog if kind is None or e.type == ModelType(kind)]
    rows = []
    for e in entries:
        here = locate_first(e.default_quant.sources) is not None
        row: dict[str, Any] = {
            "name": e.name,
            "type": e.type.value,
            "memory_mb": e.memory_mb,
            "quants": [q.id for q in e.quantizations],
            "present": here,
            "description": e.description,
        }
        if isinstance(e, EmbeddingModel):
            row |= {"dimensions": e.dimensions, "mteb_score": e.mteb_score}
        if isinstance(e, ChatModel):
            row |= {"params_b": e.params_b, "tier_hint": e.tier_hint}
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        extra = (
            f"{r['dimensions']}d MTEB {r['mteb_score']}"
            if "dimensions" in r
            else f"{r['params_b']}B {r['tier_hint']}"
        )
        mark = "*" if r["present"] else " "
        click.echo(
            f"{mark} {r['name']:<30} {r['type']:<10} {r['memory_mb']:>6} MB  "
            f"{extra:<18} {','.join(r['quants'])}"
        )
    click.echo("(* = weights on this machine)")


@main.command()
@click.option("--print", "show", is_flag=True, help="Print the unit file instead of installing it.")
@_friendly
def install(show: bool) -> None:
    """Run the stack at login: a launchd agent (macOS) or a systemd user unit (Linux)."""
    from mlx_stack import autostart

    paths = StatePaths.from_env()
    unit = autostart.unit_for(paths)
    if show:
        click.echo(f"# {unit.path}")
        click.echo(unit.text, nl=False)
        return
    if lifecycle.stack_running(paths):
        raise MlxStackError("a supervisor started by `mlx-stack up` runs this stack; "
                            "`mlx-stack down` first, so the service manager can own it")
    autostart.install(unit)
    click.echo(f"installed {unit.path} ({unit.system}); the stack starts now and at every login")


@main.command()
@_friendly
def uninstall() -> None:
    """Remove the launchd agent or systemd unit (stopping the stack it runs)."""
    from mlx_stack import autostart

    unit = autostart.unit_for(StatePaths.from_env())
    if autostart.uninstall(unit):
        click.echo(f"removed {unit.path}")
    else:
        click.echo(f"not installed ({unit.path} does not exist)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def doctor(as_json: bool) -> None:
    """Check the machine for the stack: platform, MLX, BLAS, stack, key, models, ports, disk."""
    from mlx_stack.doctor import Level, run_checks

    paths, catalog = _context()
    checks = run_checks(paths, catalog, running=lifecycle.stack_running(paths))
    if as_json:
        click.echo(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        colours = {Level.OK: "green", Level.WARN: "yellow", Level.FAIL: "red"}
        for c in checks:
            mark = click.style(f"{c.level.value:<4}", fg=colours[c.level])
            click.echo(f"{mark} {c.name:<18} {c.detail}")
            if c.fix:
                click.echo(f"     {'':<18} fix: {c.fix}")
    if any(c.level is Level.FAIL for c in checks):
        sys.exit(1)


@main.command()
@click.argument("model")
@click.option("--quant", metavar="Q", help="Quantisation id (default: the model's first).")
@_friendly
def pull(model: str, quant: str | None) -> None:
    """Download MODEL into the Hugging Face cache, with a progress bar."""
    from mlx_stack.sources import pull as do_pull

    _, catalog = _context()
    q = catalog.get(model).quant(quant)
    path = do_pull(q.sources)
    click.echo(f"{model} ({q.id}) is at {path}")


@main.command()
@_friendly
def key() -> None:
    """Print the proxy's master key (for `Authorization: Bearer ...`)."""
    paths, catalog = _context()
    try:
        name = _load(paths, catalog).proxy.key_file
    except MlxStackError:
        name = "proxy.key"
    click.echo(read_key(paths.key_file(name)))


if __name__ == "__main__":
    main()
