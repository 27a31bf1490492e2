"""`mlx-stack doctor`: check what the stack needs on this machine, each finding with a fix.

Every check is a small function returning a ``Check``; none changes anything.
"""

from __future__ import annotations

import enum
import os
import platform
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_stack import ports, private
from mlx_stack.config.catalog import Catalog
from mlx_stack.config.hardware import detect
from mlx_stack.config.stackfile import Stack, load_stack
from mlx_stack.errors import MlxStackError
from mlx_stack.paths import StatePaths

MIN_FREE_GB = 5.0


class Level(str, enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "level": self.level.value, "detail": self.detail,
                "fix": self.fix}


def check_platform() -> Check:
    hw = detect()
    if hw.system == "Darwin" and hw.machine != "arm64":
        return Check("platform", Level.FAIL, hw.summary, "MLX needs Apple Silicon on macOS")
    return Check("platform", Level.OK, f"{hw.summary}; Python {platform.python_version()}")


def check_mlx() -> Check:
    """Import MLX in a child (an import failure must not take doctor down) and ask its device."""
    code = "import mlx.core as mx; print(mx.default_device())"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("mlx", Level.FAIL, f"cannot run Python: {exc}", "reinstall mlx-stack")
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        fix = ("pip install 'mlx[cpu]' (Linux) or 'mlx[cuda]' (NVIDIA)"
               if platform.system() != "Darwin" else "pip install mlx")
        return Check("mlx", Level.FAIL, f"MLX does not import: {last}", fix)
    return Check("mlx", Level.OK, f"MLX default device: {res.stdout.strip()}")


def check_engine() -> Check:
    """Which engine the embeddings server will run, and the last measurement behind it."""
    from mlx_stack.embeddings.engine.report import engine_report

    ok, detail, fix = engine_report()
    return Check("embeddings engine", Level.OK if ok else Level.WARN, detail, fix)


def check_blas() -> Check:
    """The BLAS found, and the last choice a server measured for its model (and why)."""
    from mlx_stack.embeddings.cpu.blas import cached_choices, preload

    info = preload()
    if info.optimised:
        several = info.choice is not None and info.choice.reason.startswith("generic order")
        detail = f"{info.name} ({info.path}) without a model" if several else info.describe()
        return Check("blas", Level.OK, detail + (_measured_blas(cached_choices()) if several
                                                 else ""))  # fmt: skip
    return Check("blas", Level.WARN, info.describe() + ": MLX on the CPU is ~30x slower",
                 "pip install mkl (x86_64), or apt-get install libopenblas0-pthread, or set "
                 "MLX_STACK_BLAS to a library exposing cblas_sgemm")


def _measured_blas(entries: list[dict[str, object]]) -> str:
    """Several libraries: each model's server times them at its first start (cached)."""
    if not entries:
        return "; each model's server times the libraries found at its first start (none yet)"
    last = entries[0]
    return (f"; each model's server times the libraries found at its first start: last "
            f"{last.get('library')} for {last.get('shapes') or '?'} on {last.get('cpu') or '?'}: "
            f"{last.get('reason')}; {len(entries)} cached")


def check_key(paths: StatePaths, stack: Stack | None) -> Check:
    path = paths.key_file(stack.proxy.key_file if stack else "proxy.key")
    if not path.exists():
        return Check("proxy key", Level.FAIL, f"no key at {path}", "mlx-stack init --exist-ok")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Check("proxy key", Level.WARN, f"{path} is readable by others ({oct(mode & 0o777)})",
                     f"chmod 600 {path}")
    key = path.read_text(encoding="utf-8").strip()
    if not key.startswith("sk-") or len(key) < 20:
        return Check("proxy key", Level.FAIL, f"{path} holds a malformed key",
                     "delete it, then mlx-stack init --exist-ok")
    return Check("proxy key", Level.OK, f"{path} (mode 600)")


def check_exposure(stack: Stack) -> Check:
    """Whether the proxy binds beyond loopback: what that exposes, and how to undo it."""
    exposure = stack.proxy.exposure()
    if exposure is not None:
        return Check("exposure", Level.WARN, exposure,
                     "set proxy.host: 127.0.0.1 in the stack file")
    return Check("exposure", Level.OK, f"the proxy binds {stack.proxy.host} (this machine only)")


def check_state_folder(paths: StatePaths) -> Check:
    """The state folder is the user's alone (``private.py``); doctor reports, changes nothing."""
    home = paths.home
    if not home.exists():
        return Check("state folder", Level.OK, f"{home} does not exist yet (made private by up)")
    try:
        found = private.audit(home)
    except OSError as exc:
        return Check("state folder", Level.FAIL, f"cannot check {home}: {exc.strerror or exc}",
                     f"ls -la {home}")
    if found.refused:
        first = found.message().splitlines()[1].strip(" -")
        return Check("state folder", Level.FAIL, f"not yours alone: {first}",
                     " && ".join(found.fixes()))
    if found.loose:
        return Check("state folder", Level.WARN,
                     f"{len(found.loose)} file(s) or folder(s) in {home} are readable by others "
                     "(made private at the next up or status)", f"chmod -R go-rwx {home}")
    return Check("state folder", Level.OK, f"{home} is private (yours, mode 700/600)")


def check_stack(paths: StatePaths, catalog: Catalog) -> tuple[Check, Stack | None]:
    try:
        stack = load_stack(paths.stack_file, catalog, platform.system())
    except MlxStackError as exc:
        first = str(exc).splitlines()
        return Check("stack file", Level.FAIL, first[-1].strip(" -"),
                     "mlx-stack init, or fix the file (docs/troubleshooting.md)"), None
    n = len(stack.model_servers)
    ext = len(stack.external)
    more = f", {ext} external server(s) (command:/url: tiers)" if ext else ""
    return Check("stack file", Level.OK,
                 f"{paths.stack_file}: {n} model server(s){more}"), stack


def check_models(stack: Stack) -> list[Check]:
    from mlx_stack.config.plan import missing_weights_message, weights_path

    out = []
    entries = [(t.name, t.model, t.quant) for t in stack.model_servers]
    for name, model, quant in entries:
        path = weights_path(model, quant)
        if path is None:
            msg = missing_weights_message(name, model, quant)
            out.append(Check(f"model {name}", Level.FAIL, msg.split(";")[0],
                             msg.split("get them with: ")[-1]))
        else:
            out.append(Check(f"model {name}", Level.OK, f"{model.name} ({quant}) at {path}"))
    return out


def check_remotes(paths: StatePaths, stack: Stack) -> list[Check]:
    """Each remote stack: its key file, and one keyed call (reachable, authorised, latency,
    the models it lists); identity verdicts are the running supervisor's (`status`)."""
    from mlx_stack.cli.lifecycle import remote_statuses
    from mlx_stack.config.plan import RemoteTarget
    from mlx_stack.config.remotes import read_remote_key
    from mlx_stack.supervisor.remotes import check_remote

    verdicts = {st.name: st.models for st in remote_statuses(paths)}  # the running supervisor's
    out = []
    for r in stack.remotes:
        name = f"remote {r.name}"
        try:
            key = read_remote_key(paths.key_file(r.key_file), r.name)
        except MlxStackError as exc:
            out.append(Check(name, Level.FAIL, str(exc), "copy the remote's `mlx-stack key` "
                             f"into {paths.key_file(r.key_file)} (chmod 600)"))
            continue
        res = check_remote(RemoteTarget(r, key))
        if not res.reachable:
            out.append(Check(name, Level.WARN, f"{r.url}: {res.problem}",
                             "start that stack, or open its port in its firewall for this "
                             "machine (docs/scale-out.md)"))
        elif res.authorised is False or res.identities is None:
            out.append(Check(name, Level.FAIL, f"{r.url}: {res.problem}",
                             "put that machine's `mlx-stack key` in key_file"))
        else:
            wanted = [m.name for m in r.models]
            absent = [n for n in wanted if n not in res.identities]
            refused = [f"{m.name} refused: {m.reason}" for m in verdicts.get(r.name, ())
                       if m.verdict == "refused"]
            level = Level.WARN if absent or refused else Level.OK
            out.append(Check(
                name, level, f"{r.url}: authorised, {res.latency_ms:.0f} ms, serves "
                f"{', '.join(sorted(res.identities)) or 'nothing'}"
                + (f"; not {', '.join(absent)}" if absent else "")
                + "".join(f"; {_identity_line(n, res.identities[n])}" for n in wanted
                          if n in res.identities and res.identities[n].get("mode") != "chat")
                + "".join(f"; {x}" for x in refused),
                f"fix remotes.{r.name}.models" if absent else
                "use the same model and prefixes on both machines, or `as:` another name"
                if refused else ""))
    return out


def _identity_line(name: str, ident: dict) -> str:
    sha = ident.get("content_sha256")
    return (f"{name}: weights {sha[:12] if isinstance(sha, str) else 'unknown'}, "
            f"{ident.get('pooling')} pooling, {ident.get('dimensions')} dimensions, prefixes "
            f"{ident.get('query_prefix')!r}/{ident.get('document_prefix')!r}")


def check_ports(stack: Stack, running: bool) -> list[Check]:
    if running:
        return [Check("ports", Level.OK, "the stack is running and holds its ports")]
    out = []
    services = [pair for t in stack.model_servers  # each replica of a tier on its own port
                for pair in zip(t.replica_names, t.ports, strict=True)]
    services += [(t.name, t.port) for t in stack.external if t.port is not None]
    services.append(("proxy", stack.proxy.port))
    for name, port in services:
        if ports.is_free(port):
            out.append(Check(f"port {port}", Level.OK, f"free for {name}"))
        else:
            out.append(Check(f"port {port}", Level.FAIL, f"{name}'s port is held by "
                             f"{ports.holder(port)}", "stop that program or change the port"))
    return out


def check_disk(paths: StatePaths) -> list[Check]:
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    out = []
    for label, folder in (("state folder", paths.home), ("model cache", hf_home)):
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_gb = shutil.disk_usage(probe).free / 2**30
        level = Level.OK if free_gb >= MIN_FREE_GB else Level.WARN
        out.append(Check(f"disk ({label})", level, f"{free_gb:.1f} GB free at {probe}",
                         "" if level is Level.OK else "free some space: models need GBs"))
    return out


def run_checks(paths: StatePaths, catalog: Catalog, running: bool,
               extra: list[Callable[[], Check]] | None = None) -> list[Check]:
    checks = [check_platform(), check_mlx(), check_blas(), check_engine(),
              check_state_folder(paths)]
    stack_check, stack = check_stack(paths, catalog)
    checks.append(stack_check)
    checks.append(check_key(paths, stack))
    if stack is not None:
        checks.append(check_exposure(stack))
        checks += check_remotes(paths, stack)
        checks += check_models(stack)
        checks += check_ports(stack, running)
    checks += check_disk(paths)
    checks += [f() for f in extra or []]
    return checks
