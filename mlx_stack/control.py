"""Commands from the CLI to a running supervisor, as files: no socket, nothing to leak.

The CLI writes ``run/commands/<id>.json`` atomically; the supervisor picks it up on its next
tick (every 0.1 s), applies it, and writes ``<id>.done`` with a one-line answer.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlx_stack.atomic import write_atomic
from mlx_stack.errors import StateError
from mlx_stack.paths import StatePaths

ACTIONS = ("start", "stop", "restart", "reload")


@dataclass(frozen=True)
class Command:
    id: str
    action: str
    service: str | None


def _dir(paths: StatePaths) -> Path:
    return paths.run / "commands"


def send(
    paths: StatePaths, action: str, service: str | None = None, timeout_s: float = 30.0
) -> str:
    """Send a command and wait for the supervisor's answer."""
    if action not in ACTIONS:
        raise ValueError(action)
    cid = uuid.uuid4().hex
    folder = _dir(paths)
    write_atomic(folder / f"{cid}.json", json.dumps({"action": action, "service": service}))
    done = folder / f"{cid}.done"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done.exists():
            answer = done.read_text(encoding="utf-8")
            done.unlink(missing_ok=True)
            return answer
        time.sleep(0.05)
    (folder / f"{cid}.json").unlink(missing_ok=True)
    raise StateError(
        f"the supervisor did not answer `{action}` within {timeout_s:.0f} s; "
        "see `mlx-stack logs supervisor`"
    )


def receive(paths: StatePaths) -> Iterator[Command]:
    """Commands waiting for the supervisor, oldest first; each is consumed as it is read."""
    folder = _dir(paths)
    try:
        entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    except FileNotFoundError:
        return
    for p in entries:
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
            os.unlink(p)
        except (OSError, ValueError):
            continue
        yield Command(p.stem, str(raw.get("action")), raw.get("service"))


def answer(paths: StatePaths, cmd: Command, text: str) -> None:
    write_atomic(_dir(paths) / f"{cmd.id}.done", text)
