"""The watchdog's decisions as pure functions of time and history, so they test as tables.

Numbers follow the supervisors people trust: exponential backoff capped (k8s CrashLoopBackOff,
pm2), reset after a stable period; a crash loop (N restarts in a window) ends in FATAL
(supervisord's startretries, systemd's StartLimitBurst); a start deadline that extends while the
model is still loading (Ollama) instead of a fixed timeout.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlx_stack.config.settings import WatchSettings


def backoff_delay(consecutive_failures: int, s: WatchSettings) -> float:
    """Delay before restart number ``consecutive_failures`` (1 for the first).

    The first restart after a healthy run is immediate (a crash after hours should cost no
    extra downtime); from the second failure in a row the delay doubles from
    ``backoff_initial_s`` up to ``backoff_max_s``.
    """
    if consecutive_failures <= 1:
        return 0.0
    return min(s.backoff_max_s, s.backoff_initial_s * 2 ** (consecutive_failures - 2))


def is_crash_loop(restart_times: Sequence[float], now: float, s: WatchSettings) -> bool:
    """True when the service restarted ``crashloop_restarts`` times within the window."""
    recent = [t for t in restart_times if now - t <= s.crashloop_window_s]
    return len(recent) >= s.crashloop_restarts


def should_reset_failures(ready_since: float | None, now: float, s: WatchSettings) -> bool:
    """A service ready for ``stable_after_s`` starts its backoff afresh."""
    return ready_since is not None and now - ready_since >= s.stable_after_s


def start_deadline(started_at: float, last_progress_at: float, s: WatchSettings) -> float:
    """When a start that has not become ready is declared failed.

    ``start_timeout_s`` after the last sign of progress (log output, memory growth), and never
    later than ``start_timeout_max_s`` after the start.
    """
    return min(last_progress_at + s.start_timeout_s, started_at + s.start_timeout_max_s)


#: Exit codes that mean "restarting will not help": a usage error (argparse, click), our own
#: servers' "bad model folder" (2) and "port taken" (3), and the shell's "command not found".
UNFIXABLE_EXIT_CODES = frozenset({2, 3, 126, 127})


def exit_is_unfixable(code: int | None, during_start: bool) -> bool:
    """An exit during start with a code that says the arguments or environment are wrong."""
    return during_start and code in UNFIXABLE_EXIT_CODES
