"""Commands from the CLI to a running supervisor, and its answers: typed records, as files.

The CLI writes ``run/commands/<id>.json`` atomically; the supervisor reads it on its next tick
(every 0.1 s), deletes it, applies it and writes ``<id>.answer``. No socket, nothing to leak.

Both sides validate: the CLI builds a :class:`Command` only from an :class:`Action` and a
checked name; the supervisor parses every file with :func:`parse_command`, which turns anything
else (not JSON, not an object, an unknown action, a file that vanished or cannot be read) into
a :class:`CommandError` that is answered, never raised into the loop. A bad file is removed
once read, so it cannot trouble the next supervisor either.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_stack.atomic import write_atomic
from mlx_stack.errors import StateError
from mlx_stack.private import open_read

MAX_COMMAND_BYTES = 64 * 1024
"""A command is a few dozen bytes; a larger file is refused unread."""
ANSWER_SUFFIX = ".answer"
STALE_ANSWER_S = 600.0
"""Answers nobody collected (the CLI gave up, or a garbage file was answered) are removed."""
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class Action(str, enum.Enum):
    START = "start"  # start a stopped service (or every one); clears backoff and fatal
    STOP = "stop"  # stop a service and keep it stopped
    RESTART = "restart"  # stop (if running) and start again; clears fatal
    RELOAD = "reload"  # re-read the stack file now


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"  # not JSON, not an object, wrong field types, unreadable
    UNKNOWN_ACTION = "unknown_action"
    UNKNOWN_SERVICE = "unknown_service"
    STACK_INVALID = "stack_invalid"  # a reload found an invalid stack file: nothing changed
    INTERNAL = "internal"  # a supervisor bug while applying it: logged; the stack keeps serving


@dataclass(frozen=True)
class CommandError:
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Command:
    """One request. ``target`` is a service name, or None for every service."""

    id: str
    action: Action
    target: str | None = None

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise ValueError(f"bad command id {self.id!r}")
        if not isinstance(self.action, Action):
            raise ValueError(f"bad action {self.action!r}")
        if self.target is not None and not _NAME.match(self.target):
            raise ValueError(f"bad service name {self.target!r}")

    @classmethod
    def new(cls, action: Action, target: str | None = None) -> Command:
        return cls(uuid.uuid4().hex, action, target)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action.value, "target": self.target}


@dataclass(frozen=True)
class Answer:
    """The supervisor's reply: ``result`` on success, else ``error``; ``services`` it knows."""

    id: str
    result: str = ""
    error: CommandError | None = None
    services: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ok": self.ok,
            "result": self.result,
            "error": None if self.error is None
            else {"code": self.error.code.value, "message": self.error.message},
            "services": list(self.services),
        }


def parse_command(cid: str, raw: bytes) -> Command | CommandError:
    """A command file's bytes as a Command, or what is wrong with them."""
    def bad(msg: str) -> CommandError:
        return CommandError(ErrorCode.MALFORMED, f"command {cid}: {msg}")

    if len(raw) > MAX_COMMAND_BYTES:
        return bad(f"larger than {MAX_COMMAND_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return bad(f"not JSON ({str(exc)[:120]})")
    if not isinstance(body, dict):
        return bad(f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"action", "target"})
    if unknown:
        return bad(f"unknown field(s) {', '.join(map(str, unknown))}; expected action, target")
    action, target = body.get("action"), body.get("target")
    if not isinstance(action, str):
        return bad("'action' must be a string")
    try:
        act = Action(action)
    except ValueError:
        return CommandError(
            ErrorCode.UNKNOWN_ACTION,
            f"unknown action {action[:64]!r}; actions: {', '.join(a.value for a in Action)}",
        )
    if target is not None and (not isinstance(target, str) or not _NAME.match(target)):
        return bad("'target' must be null or a service name")
    return Command(cid, act, target)


def parse_answer(raw: bytes) -> Answer:
    """The supervisor's answer; a malformed one is a StateError (a bug or a stranger's file)."""
    try:
        body = json.loads(raw)
        err = body["error"]
        return Answer(
            id=str(body["id"]),
            result=str(body.get("result", "")),
            error=None if err is None
            else CommandError(ErrorCode(err["code"]), str(err["message"])),
            services=tuple(str(s) for s in body.get("services", ())),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"the supervisor's answer is unreadable ({exc})") from None


@dataclass(frozen=True)
class Received:
    """What the supervisor took from the folder: a command to apply, or an error to answer."""

    id: str
    command: Command | None
    error: CommandError | None


class Mailbox:
    """The command folder. The CLI calls :meth:`send`; the supervisor :meth:`receive` and
    :meth:`answer`. Nothing here raises into the supervisor's loop for a bad file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    # ----- the CLI's side --------------------------------------------------------------

    def send(self, cmd: Command, timeout_s: float = 30.0) -> Answer:
        """Send a command and wait for the answer (StateError if none comes in time)."""
        request = self.folder / f"{cmd.id}.json"
        write_atomic(request, json.dumps(cmd.to_json()), mode=0o600)
        reply = self.folder / f"{cmd.id}{ANSWER_SUFFIX}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                raw = reply.read_bytes()
            except FileNotFoundError:
                time.sleep(0.05)
                continue
            reply.unlink(missing_ok=True)
            return parse_answer(raw)
        request.unlink(missing_ok=True)
        raise StateError(
            f"the supervisor did not answer `{cmd.action.value}` within {timeout_s:.0f} s; "
            "see `mlx-stack logs supervisor`"
        )

    # ----- the supervisor's side -------------------------------------------------------

    def receive(self) -> Iterator[Received]:
        """Every waiting command, oldest first; each file is removed as it is read."""
        try:
            entries = [e for e in os.scandir(self.folder)
                       if e.name.endswith(".json") and not e.name.startswith(".")]
        except FileNotFoundError:
            return
        except OSError as exc:
            yield Received("-", None, CommandError(
                ErrorCode.MALFORMED, f"cannot list {self.folder}: {exc}"))
            return
        entries.sort(key=_mtime)
        for entry in entries:
            yield self._take(Path(entry.path))

    def _take(self, path: Path) -> Received:
        stem = path.name[: -len(".json")]
        cid = stem if _ID.match(stem) else _safe_id(stem)
        try:
            with open_read(path) as f:  # not through a link; a FIFO cannot block the loop
                raw = f.read(MAX_COMMAND_BYTES + 1)
        except FileNotFoundError:
            return Received(cid, None, CommandError(
                ErrorCode.MALFORMED, f"command {cid}: the file vanished before it was read"))
        except OSError as exc:
            _discard(path)
            return Received(cid, None, CommandError(
                ErrorCode.MALFORMED, f"command {cid}: unreadable ({exc.strerror or exc})"))
        _discard(path)
        parsed = parse_command(cid, raw)
        if isinstance(parsed, CommandError):
            return Received(cid, None, parsed)
        return Received(cid, parsed, None)

    def answer_file(self, answer: Answer) -> tuple[Path, str]:
        """Where the answer goes and its text; the supervisor writes it atomically."""
        return self.folder / f"{answer.id}{ANSWER_SUFFIX}", json.dumps(answer.to_json())

    def sweep(self, now_wall: float, older_than_s: float = STALE_ANSWER_S) -> None:
        """Remove answers nobody collected."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.folder):
                if entry.name.endswith(ANSWER_SUFFIX):
                    with contextlib.suppress(OSError):
                        if now_wall - entry.stat().st_mtime > older_than_s:
                            os.unlink(entry.path)


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat().st_mtime
    except OSError:
        return 0.0


def _safe_id(stem: str) -> str:
    """An id for a file whose name is not one of ours (a stranger's or a broken file)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:48] or "unnamed"
    return f"bad-{cleaned}"


def _discard(path: Path) -> None:
    """Remove a read command file; a directory or an undeletable file is moved aside."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        with contextlib.suppress(OSError):
            path.rename(path.with_name(path.name + ".rejected"))


def known_names_message(name: str, services: Sequence[str]) -> str:
    """The one wording of "no such service", used by the CLI and the supervisor alike."""
    from mlx_stack.config.schema import close_matches

    return (f"no service named {name!r}{close_matches(name, list(services))}; "
            f"services: {', '.join(services) or 'none'}")
