"""What the supervisor tells: its own log lines, warnings, and contained bugs.

Warnings (a write that failed, a command that could not be answered) are kept for `status`
and logged at most once a minute per kind, so a full disk does not flood the log it cannot
write anyway; a bug's traceback is logged the same way.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable

from mlx_stack.supervisor.runtime import Runtime

REPEAT_LOG_S = 60.0
WARNING_KEEP_S = 600.0


class Reporter:
    def __init__(self, runtime: Runtime, say: Callable[[str], None] | None = None) -> None:
        self.rt = runtime
        self._say = say or _stderr
        self._warnings: deque[tuple[float, str]] = deque(maxlen=10)
        self._last_logged: dict[str, float] = {}
        self._failing: set[str] = set()
        #: Set when a new warning arrived (the loop then writes a snapshot soon).
        self.changed = False

    def say(self, text: str) -> None:
        """One line into the supervisor's own log (its stderr); never raises."""
        with contextlib.suppress(OSError, ValueError):
            self._say(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}")

    def warn(self, key: str, text: str) -> None:
        """A problem worked around: shown in `status`, logged at most once a minute per key."""
        now = self.rt.monotonic()
        self._failing.add(key)
        if not self._warnings or self._warnings[-1][1] != text:
            self._warnings.append((self.rt.wall(), text))
            self.changed = True
        if now - self._last_logged.get(key, -REPEAT_LOG_S) >= REPEAT_LOG_S:
            self._last_logged[key] = now
            self.say(f"warning: {text}")

    def recovered(self, key: str, text: str) -> None:
        if key in self._failing:
            self._failing.discard(key)
            self._last_logged.pop(key, None)
            self.say(text)

    def internal_error(self, where: str, exc: BaseException) -> str:
        """A bug, contained: its traceback goes to the supervisor log (once a minute per kind)."""
        text = f"internal error in {where}: {type(exc).__name__}: {exc}"
        key = f"bug:{where}:{type(exc).__name__}"
        now = self.rt.monotonic()
        if now - self._last_logged.get(key, -REPEAT_LOG_S) >= REPEAT_LOG_S:
            self._last_logged[key] = now
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.say(f"{text}; the stack keeps running. Please report this:\n{tb.rstrip()}")
        return text

    def recent(self) -> tuple[str, ...]:
        """Warnings of the last ten minutes, each with its time, oldest first."""
        horizon = self.rt.wall() - WARNING_KEEP_S
        return tuple(f"{time.strftime('%H:%M:%S', time.localtime(at))} {text}"
                     for at, text in self._warnings if at >= horizon)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
