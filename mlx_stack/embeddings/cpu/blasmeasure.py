"""Time each candidate BLAS in its own child process, rounds interleaved, within a budget.

All children start at once (loading and warming up in parallel), then rounds go library by
library, one child working at a time, so a busy moment on the machine hits every library
alike; the medians are compared. A child that fails to start, crashes or does not answer
before the deadline is skipped with the reason; the whole measurement never takes more than
:data:`BUDGET_SECONDS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from .blaschoice import LibTiming, Measurement, Shapes

BUDGET_SECONDS = 5.0
"""A first start waits at most this long for the measurement, children's start included."""
TIMING_SECONDS = 1.5
"""Rounds go on until this long has been spent timing (or :data:`MAX_ROUNDS`): on a busy
2-core machine one round's figures swing 2-4x (another process takes a core from a BLAS
thread), so a median needs many rounds (MiniLM: ~50 ms per library per round)."""
MAX_ROUNDS = 25
MIN_ROUNDS = 3


def measure(paths: Sequence[str], shapes: Shapes, env: Mapping[str, str] | None = None,
            budget: float = BUDGET_SECONDS) -> Measurement:  # fmt: skip
    """Time ``paths`` on ``shapes``; never raises for a library's failure."""
    started = time.monotonic()
    deadline = started + budget
    result = Measurement()
    children = [_Child.start(path, shapes, _child_env(paths, env)) for path in paths]
    try:
        ready: list[_Child] = []
        for child in children:
            reply = child.reply(deadline)
            if "name" in reply:
                child.name = str(reply["name"])
                ready.append(child)
            else:
                result.skipped[child.path] = child.failure(reply)
                child.stop()
        rounds: dict[str, list[tuple[float, float]]] = {c.path: [] for c in ready}
        timing_started = time.monotonic()
        while ready and result.rounds < MAX_ROUNDS:
            round_started = time.monotonic()
            for child in list(ready):
                reply = child.ask("round", deadline)
                if "short_ms" in reply:
                    rounds[child.path].append((float(reply["short_ms"]),
                                               float(reply["batch_ms"])))  # fmt: skip
                else:
                    result.skipped[child.path] = child.failure(reply)
                    ready.remove(child)
                    child.stop()
            result.rounds += 1
            now = time.monotonic()
            if now + (now - round_started) > deadline:
                break  # another round would overrun the budget
            if result.rounds >= MIN_ROUNDS and now - timing_started > TIMING_SECONDS:
                break
        for child in ready:
            times = rounds[child.path]
            result.timings[child.path] = LibTiming(
                child.name, round(statistics.median(t[0] for t in times), 4),
                round(statistics.median(t[1] for t in times), 4))
    finally:
        for child in children:
            child.stop()
    result.seconds = time.monotonic() - started
    return result


def _child_env(paths: Sequence[str], env: Mapping[str, str] | None) -> dict[str, str]:
    """The server's environment, minus candidate libraries in ``LD_PRELOAD`` (a preloaded BLAS
    would answer every child's products)."""
    child = dict(os.environ if env is None else env)
    preload = [p for p in child.get("LD_PRELOAD", "").split(":") if p and p not in paths]
    if preload:
        child["LD_PRELOAD"] = ":".join(preload)
    else:
        child.pop("LD_PRELOAD", None)
    return child


class _Child:
    """One timing process, spoken to in JSON lines with deadlines."""

    def __init__(self, path: str, process: subprocess.Popen[bytes] | None, stderr: IO[bytes],
                 problem: str = "") -> None:  # fmt: skip
        self.path = path
        self.process = process
        self.stderr = stderr
        self.problem = problem
        self.name = os.path.basename(path)
        self._buffer = b""

    @classmethod
    def start(cls, path: str, shapes: Shapes, env: dict[str, str]) -> _Child:
        stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "mlx_stack.embeddings.cpu.blastime", path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
                start_new_session=True)  # fmt: skip
        except OSError as exc:
            return cls(path, None, stderr, f"cannot start the timing process: {exc}")
        child = cls(path, process, stderr)
        child._send(json.dumps(shapes.as_json()))
        return child

    def ask(self, line: str, deadline: float) -> dict[str, Any]:
        self._send(line)
        return self.reply(deadline)

    def reply(self, deadline: float) -> dict[str, Any]:
        """The next JSON line, or ``{"error": why}``."""
        if self.process is None or self.process.stdout is None:
            return {"error": self.problem}
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return {"error": "timed out (the measurement's budget is "
                                 f"{BUDGET_SECONDS:g} s)"}  # fmt: skip
            chunk = os.read(fd, 65536)
            if not chunk:
                return {"error": "exited"}
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            data = json.loads(line)
        except ValueError:
            return {"error": f"unexpected output {line[:80]!r}"}
        return data if isinstance(data, dict) else {"error": f"unexpected output {line[:80]!r}"}

    def failure(self, reply: Mapping[str, Any]) -> str:
        """Why this library was skipped, with the child's last stderr line if it died."""
        why = str(reply.get("error", "no answer"))
        code = None
        if self.process is not None and why == "exited":
            try:  # it is exiting right now
                code = self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None and code != 0:
            why = f"{why} (exit {code}" + (f": {self._last_error()})" if self._last_error()
                                           else ")")  # fmt: skip
        return why

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(OSError):  # its own session, started here
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.stderr.close()
        self.process = None
        self.problem = "stopped"

    def _send(self, line: str) -> None:
        if self.process is None or self.process.stdin is None:
            return
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except OSError:
            pass  # it died: the reply says so

    def _last_error(self) -> str:
        try:
            self.stderr.seek(0)
            lines = self.stderr.read()[-4000:].decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        return lines[-1][:200] if lines else ""
