"""The `mlx-stack` command: parse arguments, call the core, render. No logic of its own."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import wraps
from typing import Any, TypeVar

import click

from mlx_stack import __version__, backendkey, logfiles
from mlx_stack.cli import embedding_record, lifecycle, render
from mlx_stack.config.catalog import (
    Catalog,
    CatalogEntry,
    ChatModel,
    EmbeddingModel,
    ModelType,
    RerankModel,
    load_catalog,
)
from mlx_stack.config.hardware import detect
from mlx_stack.config.plan import Plan, build_plan
from mlx_stack.config.proxykey import ensure_key, read_key
from mlx_stack.config.stackfile import (
    EMBEDDINGS_MODEL_NAME,
    RERANK_MODEL_NAME,
    Stack,
    load_stack,
)
from mlx_stack.errors import MlxStackError
from mlx_stack.paths import StatePaths
from mlx_stack.ports import connect_host
from mlx_stack.private import secure_state_folder

F = TypeVar("F", bound=Callable[..., Any])
SERVICES_HELP = "a chat tier name, 'embeddings', 'rerank' or 'proxy'"


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


def _context(secure: bool = False, create: bool = False) -> tuple[StatePaths, Catalog]:
    """The state folder and the catalog. With ``secure``, the state folder is checked first:
    refused if another user owns or can write anything in it; made private if only readable
    (``private.py``). ``create`` makes it (private) when absent."""
    paths = StatePaths.from_env()
    if secure or create:
        for note in secure_state_folder(paths.home, create=create):
            click.echo(f"note: {note}", err=True)
    return paths, load_catalog(paths.user_catalog)


def _load(paths: StatePaths, catalog: Catalog) -> Stack:
    return load_stack(paths.stack_file, catalog, detect().system)


def _plan(paths: StatePaths, stack: Stack) -> Plan:
    return build_plan(stack, paths)


def _say(service: str, message: str) -> None:
    click.echo(f"  {service:<12} {message}", err=True)


def _emit(body: object) -> None:
    """The one way a command writes JSON: stdout, nothing else on it (messages go to stderr)."""
    click.echo(json.dumps(body, indent=2))


JSON_HELP = "Machine-readable output on stdout (docs/status.md)."


@contextlib.contextmanager
def _loading(as_json: bool) -> Iterator[tuple[lifecycle.Report, lifecycle.Watch | None]]:
    """Live progress on a terminal; plain lines on stderr otherwise (logs, CI, --json)."""
    con = render.console(stderr=True)
    if as_json or not con.is_terminal:
        yield _say, None
        return
    with render.LoadDisplay(con) as display:
        yield display.say, display.update


def _service_names(include_logs: bool = False) -> list[str]:
    """Names a SERVICE argument accepts, from the stack file (for shell completion)."""
    names: list[str] = []
    with contextlib.suppress(Exception):  # completion must never print a traceback
        paths, catalog = _context()
        stack = _load(paths, catalog)
        names = [n for t in stack.model_servers for n in t.replica_names]
        names += [t.name for t in stack.external if t.supervised]  # command: tiers
        names.append("proxy")
        if include_logs:
            names.append("supervisor")
    return names


def _complete_services(
    _ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[str]:
    return [n for n in _service_names() if n.startswith(incomplete)]


def _complete_log_names(
    _ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[str]:
    return [n for n in _service_names(include_logs=True) if n.startswith(incomplete)]


def _complete_models(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    with contextlib.suppress(Exception):
        return [e.name for e in _context()[1] if e.name.startswith(incomplete)]
    return []


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
    shell_complete=_complete_models,
    help="Add an embeddings tier with MODEL to an existing stack file.",
)
@click.option("--with-rerank", is_flag=True, help="Add a rerank tier (port 8004).")
@click.option(
    "--add-rerank",
    "add_rerank",
    metavar="MODEL",
    shell_complete=_complete_models,
    help="Add a rerank tier with MODEL to an existing stack file.",
)
@click.option(
    "--force", is_flag=True, help="Replace an existing stack file (or embeddings/rerank tier)."
)
@click.option("--pull", is_flag=True, help="Download the recommended models first (needs network).")
@click.option(
    "--exist-ok", is_flag=True, help="Leave an existing stack file as it is (for scripts)."
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def init(
    with_embeddings: bool,
    add_model: str | None,
    with_rerank: bool,
    add_rerank: str | None,
    force: bool,
    pull: bool,
    exist_ok: bool,
    as_json: bool,
) -> None:
    """Write the stack file for this machine (and the proxy key)."""
    from mlx_stack.config import stackinit

    paths, catalog = _context(create=True)
    hw = detect()
    if add_model and add_rerank:
        raise click.UsageError("give --add-embeddings or --add-rerank, one at a time")
    if exist_ok and not force and not add_model and not add_rerank and paths.stack_file.exists():
        key_file = stackinit.key_file_of(paths, catalog, hw)
        created = ensure_key(key_file)
        if as_json:
            _emit({"stack_file": str(paths.stack_file), "written": False,
                   "key_file": str(key_file), "key_created": created})
            return
        click.echo(f"{paths.stack_file} exists; left as it is")
        if created:
            click.echo(f"created the missing proxy key in {key_file} (mode 0600)")
        return
    if add_model:
        res = stackinit.add_embeddings(paths, catalog, hw, add_model, force=force)
    elif add_rerank:
        res = stackinit.add_rerank(paths, catalog, hw, add_rerank, force=force)
    else:
        puller = None
        if pull:
            from mlx_stack.config.sources import pull as do_pull

            def puller(entry: CatalogEntry, quant: str) -> Any:
                click.echo(f"pulling {entry.name} ({quant})", err=True)
                return do_pull(entry.quant(quant).sources)

        res = stackinit.init_stack(
            paths, catalog, hw, with_embeddings=with_embeddings, force=force, pull=puller,
            with_rerank=with_rerank,
        )
    warning = embedding_record.mismatch(
        paths, embedding_record.current_identity(paths, res.stack.embeddings))
    if as_json:
        e, r = res.stack.embeddings, res.stack.rerank
        _emit({
            "stack_file": str(res.path),
            "written": True,
            "hardware": hw.summary,
            "tiers": [{"name": t.name, "model": t.model.name, "quant": t.quant, "port": t.port}
                      for t in res.stack.tiers],
            "embeddings": None if e is None else {
                "model": e.model.name, "quant": e.quant, "port": e.port,
                "served_as": EMBEDDINGS_MODEL_NAME},
            "rerank": None if r is None else {
                "model": r.model.name, "quant": r.quant, "port": r.port,
                "served_as": RERANK_MODEL_NAME},
            "not_downloaded": [{"tier": tier, "model": entry.name,
                                "fix": f"mlx-stack pull {entry.name}"}
                               for tier, entry in res.missing],
            "key_file": str(res.key_file),
            "key_created": res.key_created,
            "warnings": [warning] if warning else [],
        })
        return
    click.echo(f"wrote {res.path} ({hw.summary})")
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
    if res.stack.rerank:
        r = res.stack.rerank
        click.echo(f"  rerank          {r.model.name} ({r.quant}) on port {r.port}, "
                   f"as model '{RERANK_MODEL_NAME}'")
    for tier, entry in res.missing:
        click.echo(f"  not downloaded: {tier}: {entry.name}; run `mlx-stack pull {entry.name}`")
    if res.key_created:
        click.echo(f"created the proxy key in {res.key_file} (mode 0600); `mlx-stack key` shows it")
    click.echo("next: mlx-stack up")


@main.command()
@click.option(
    "--tier",
    metavar="NAME",
    shell_complete=_complete_services,
    help="Start only this model server (a tier, 'embeddings' or 'rerank').",
)
@click.option(
    "--foreground",
    is_flag=True,
    help="Run the supervisor in this process (for launchd and systemd).",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def up(tier: str | None, foreground: bool, as_json: bool) -> None:
    """Start the stack under its supervisor; return when every service answers real requests.

    On a terminal, each model server shows a bar while it loads: its memory against the size
    of its weights; the bar fills only once the server answers a real request.
    """
    paths, catalog = _context(create=True)
    stack = _load(paths, catalog)
    plan = _plan(paths, stack)
    if foreground:
        sys.exit(lifecycle.run_foreground(plan, paths, tier))
    ident = embedding_record.current_identity(paths, stack.embeddings)
    warnings = [w for w in (embedding_record.mismatch(paths, ident), stack.proxy.exposure()) if w]
    for w in warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    with _loading(as_json) as (report, watch):
        result = lifecycle.up(stack, plan, paths, tier=tier, report=report, watch=watch)
    if ident is not None and tier in (None, "embeddings"):
        embedding_record.record(paths, ident)
    p = stack.proxy
    host = connect_host(p.host)
    has_embeddings = stack.embeddings is not None or stack.external_embeddings is not None
    names = [*stack.chat_names, *([EMBEDDINGS_MODEL_NAME] if has_embeddings else []),
             *([RERANK_MODEL_NAME] if stack.rerank else [])]
    if as_json:
        _emit({
            "endpoint": f"http://{host}:{p.port}/v1",
            "models": names,
            "started": list(result.started),
            "warnings": warnings,
            "services": [r.to_json() for r in lifecycle.status(paths, result.plan)],
        })
        return
    if tier is None:
        from mlx_stack.cli.endpoints import unreachable_warnings

        for w in unreachable_warnings(result.plan.endpoints):
            click.secho(f"warning: {w}", fg="yellow", err=True)
        click.echo(f"stack is up: http://{host}:{p.port}/v1 serves {', '.join(names)}")
        click.echo("  the key: `mlx-stack key`; state: `mlx-stack status`")
    else:
        click.echo(f"{tier} is up")


@main.command()
@click.option(
    "--tier",
    metavar="NAME",
    shell_complete=_complete_services,
    help=f"Stop only this service ({SERVICES_HELP}).",
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for the stack to stop before killing the supervisor.",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def down(tier: str | None, timeout: float, as_json: bool) -> None:
    """Stop the proxy, then every model server (whole process groups), then the supervisor."""
    paths, catalog = _context(secure=True)
    plan = _plan_or_none(paths, catalog) if tier is not None else None
    stopped = lifecycle.down(paths, tier=tier, plan=plan, report=_say, timeout_s=timeout)
    if as_json:
        _emit({"stopped": stopped})
        return
    click.echo(f"stopped {len(stopped)} service(s)" if stopped else "nothing was running")


def _plan_or_none(paths: StatePaths, catalog: Catalog) -> Plan | None:
    try:
        return _plan(paths, _load(paths, catalog))
    except MlxStackError:
        return None


@main.command()
@click.argument("service", required=False, shell_complete=_complete_services)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def restart(service: str | None, as_json: bool) -> None:
    """Restart SERVICE (or every service); this also clears a `fatal` state."""
    paths, catalog = _context(secure=True)
    plan = _plan_or_none(paths, catalog)
    with _loading(as_json) as (report, watch):
        names = lifecycle.restart(paths, service, report=report, watch=watch, plan=plan)
    if as_json:
        _emit({"restarted": names,
               "services": [r.to_json() for r in lifecycle.status(paths, plan)]})
        return
    click.echo(f"{service or 'the stack'} is ready")


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def status(as_json: bool) -> None:
    """Show every service: state, model, port, pid, uptime, restarts, last exit."""
    paths, catalog = _context(secure=True)
    plan, problem, warnings = None, "", []
    try:
        stack = _load(paths, catalog)
        warning = embedding_record.mismatch(
            paths, embedding_record.current_identity(paths, stack.embeddings))
        warnings += [warning] if warning else []
        exposure = stack.proxy.exposure()
        warnings += [exposure] if exposure else []
        plan = _plan(paths, stack)
    except MlxStackError as exc:
        problem = str(exc)
    problem = lifecycle.stack_problem(paths) or problem
    warnings += lifecycle.supervisor_warnings(paths)
    rows = lifecycle.status(paths, plan)
    remotes = lifecycle.remote_statuses(paths)
    if as_json:
        body = {
            "stack_file": str(paths.stack_file),
            "problem": problem or None,
            "warnings": warnings,
            "services": [r.to_json() for r in rows],
            "remotes": [{"name": r.name, "state": render.remote_state(r), **r.to_json()}
                        for r in remotes],
        }
        _emit(body)
        return
    if problem:
        click.secho(f"stack file: {problem}", fg="yellow", err=True)
    for w in warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    con = render.console()
    con.print(render.status_table(rows))
    if remotes:
        con.print()
        con.print(render.remotes_table(remotes))
    for line in render.fatal_logs(rows):
        con.print(line, markup=False)


@main.command("logs")
@click.argument("service", shell_complete=_complete_log_names)
@click.option("-n", "lines", default=50, show_default=True, help="How many lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option(
    "--all", "all_files", is_flag=True, help="Read the rotated backups too, oldest first."
)
@_friendly
def logs_cmd(service: str, lines: int, follow: bool, all_files: bool) -> None:
    """Show a service's log (a tier name, 'embeddings', 'rerank', 'proxy' or 'supervisor').

    Control characters in it (terminal escapes, carriage returns) are shown, not obeyed:
    ESC as ^[, CR as ^M.
    """
    paths, catalog = _context(secure=True)
    logged = sorted(p.stem for p in paths.logs.glob("*.log")) if paths.logs.exists() else []
    plan = _plan_or_none(paths, catalog)
    names = [*lifecycle.known_services(paths, plan), "supervisor"]
    lifecycle.check_service_name(service, [*names, *(n for n in logged if n not in names)])
    members = lifecycle.addressed(paths, plan, service)
    if len(members) > 1:  # a tier with replicas: each replica's log, under its name
        _tier_logs(paths, members, lines, follow, all_files)
        return
    service = members[0]
    path = paths.log_file(service)
    if path.is_symlink() or (path.exists() and not logfiles.is_log(path)):
        raise MlxStackError(
            f"{path} is not a regular file (a link?); logs are never read or written through "
            "one: delete it, and the supervisor writes a new log there"
        )
    if not path.exists() and not follow:
        raise MlxStackError(
            f"no log for {service!r} yet at {path}; logs exist for: "
            f"{', '.join(logged) or 'nothing yet'}"
        )
    show = logfiles.printable
    if all_files:
        for f in logfiles.all_log_files(path):
            for line in logfiles.read_lines(f):
                click.echo(show(line))
    else:
        for line in logfiles.tail(path, lines):
            click.echo(show(line))
    if follow:
        for line in logfiles.follow(path):
            click.echo(show(line))


def _tier_logs(paths: StatePaths, members: Sequence[str], lines: int, follow: bool,
               all_files: bool) -> None:
    """`logs embeddings` with replicas: each replica's lines under a header; with ``-f``, new
    lines of every replica as they come, each prefixed with its replica's name."""
    show = logfiles.printable
    for name in members:
        path = paths.log_file(name)
        if path.is_symlink() or (path.exists() and not logfiles.is_log(path)):
            continue  # never read through a link; `logs NAME` says why
        click.echo(f"==> {name} <==")
        files = logfiles.all_log_files(path) if all_files else [path]
        for f in files:
            for line in (logfiles.read_lines(f) if all_files else logfiles.tail(f, lines)):
                click.echo(show(line))
    if follow:
        width = max(len(n) for n in members)
        for name, line in logfiles.follow_many({n: paths.log_file(n) for n in members}):
            click.echo(f"{name:<{width}} | {show(line)}")


@main.command()
@click.option(
    "--type", "kind", type=click.Choice([t.value for t in ModelType]), help="Only this type."
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def models(kind: str | None, as_json: bool) -> None:
    """List the model catalog."""
    from mlx_stack.config.sources import locate_first

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
        if isinstance(e, RerankModel):
            row |= {"params_m": e.params_m, "max_sequence_length": e.max_sequence_length}
        rows.append(row)
    if as_json:
        _emit(rows)
        return
    render.console().print(render.models_table(rows))
    click.echo("(* = weights on this machine)")


@main.command()
@click.option("--print", "show", is_flag=True, help="Print the unit file instead of installing it.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def install(show: bool, as_json: bool) -> None:
    """Run the stack at login: a launchd agent (macOS) or a systemd user unit (Linux)."""
    from mlx_stack.cli import autostart

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
    if as_json:
        _emit({"unit": str(unit.path), "system": unit.system, "installed": True})
        return
    click.echo(f"installed {unit.path} ({unit.system}); the stack starts now and at every login")


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def uninstall(as_json: bool) -> None:
    """Remove the launchd agent or systemd unit (stopping the stack it runs)."""
    from mlx_stack.cli import autostart

    unit = autostart.unit_for(StatePaths.from_env())
    removed = autostart.uninstall(unit)
    if as_json:
        _emit({"unit": str(unit.path), "system": unit.system, "removed": removed})
    elif removed:
        click.echo(f"removed {unit.path}")
    else:
        click.echo(f"not installed ({unit.path} does not exist)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def doctor(as_json: bool) -> None:
    """Check the machine for the stack: platform, MLX, BLAS, stack, key, models, ports, disk."""
    from mlx_stack.cli.doctor import Level, run_checks

    paths, catalog = _context()
    checks = run_checks(paths, catalog, running=lifecycle.stack_running(paths))
    if as_json:
        _emit([c.to_json() for c in checks])
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
@click.argument("model", shell_complete=_complete_models)
@click.option("--quant", metavar="Q", help="Quantisation id (default: the model's first).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_friendly
def pull(model: str, quant: str | None, as_json: bool) -> None:
    """Download MODEL into the Hugging Face cache, with a progress bar."""
    from mlx_stack.config.sources import pull as do_pull

    _, catalog = _context()
    q = catalog.get(model).quant(quant)
    path = do_pull(q.sources)
    if as_json:
        _emit({"model": model, "quant": q.id, "path": str(path)})
        return
    click.echo(f"{model} ({q.id}) is at {path}")


@main.command()
@click.option("--backend", is_flag=True,
              help="Print the running stack's backend key instead: what a direct call to a "
              "chat, embeddings or rerank port must send (new at each supervisor start).")
@_friendly
def key(backend: bool) -> None:
    """Print the proxy's master key (for `Authorization: Bearer ...`)."""
    paths, catalog = _context(secure=True)
    if backend:
        click.echo(backendkey.read_key(paths.backend_key))
        return
    try:
        name = _load(paths, catalog).proxy.key_file
    except MlxStackError:
        name = "proxy.key"
    click.echo(read_key(paths.key_file(name)))


