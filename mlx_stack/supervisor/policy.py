"""The watchdog's decisions as pure functions of time and history, so they test as tables.

Numbers follow the supervisors people trust: exponential backoff capped (k8s CrashLoopBackOff,
pm2), reset after a stable period; a crash loop (N restarts in a window) ends in FATAL
(supervisord's startretries, systemd's StartLimitBurst); a start deadline that extends while the
model is still loading (Ollama) instead of a fixed timeout; a hang told from long work by
what the process shows (``judge_hang``), since peers that kill on a timeout kill long
generations (LocalAI's busy watchdog) and peers without one never notice a deadlock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


# ----- hung or busy --------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What one liveness check saw of a running service."""

    at: float
    answered: bool  # its health route sent an HTTP response (any status)
    alive: bool  # ... and it was 200
    stopped: bool  # the process is stopped (SIGSTOP, a debugger): it cannot answer
    cpu_s: float | None  # CPU time of its process tree so far
    output: int  # bytes of log so far


class Verdict(str, enum.Enum):
    OK = "ok"  # answers its health route
    SUSPECT = "suspect"  # no answer yet for less than hang_after_s: watch closely
    BUSY = "busy"  # no answer, but it works (CPU, output): never restarted for that
    BROKEN = "broken"  # answers, but unhealthy, failure_threshold times in a row
    HUNG = "hung"  # stopped, or no answer, no CPU and no output for hang_after_s


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""


#: CPU share of one core, over the hang window, that counts as working (idle servers with a
#: deadlock measured ~0; a busy one near 1).
BUSY_CPU_SHARE = 0.05


def judge_hang(history: Sequence[Observation], s: WatchSettings,
               unanswered_since: float | None = None) -> Judgement:
    """Hung or busy, from the last liveness checks (oldest first).

    ``unanswered_since``: when the current run of unanswered checks began, if it began before
    the oldest observation kept.

    A stopped process (seen twice) is hung at once. A process that does not answer is hung
    only when, for ``hang_after_s``, it also used no CPU time and wrote no output; one that
    keeps working is busy and is left alone up to ``unresponsive_max_s``.
    """
    if not history:
        return Judgement(Verdict.OK)
    last = history[-1]
    if last.stopped and len(history) >= 2 and history[-2].stopped:
        return Judgement(Verdict.HUNG, "stopped (SIGSTOP or a debugger): alive, never answers")
    if last.answered:
        if last.alive:
            return Judgement(Verdict.OK)
        bad = _trailing(history, lambda o: o.answered and not o.alive)
        if len(bad) >= s.failure_threshold:
            return Judgement(Verdict.BROKEN, f"its health route failed {len(bad)} times in a row")
        return Judgement(Verdict.SUSPECT, f"health route failed {len(bad)}/"
                         f"{s.failure_threshold}")
    silent = _trailing(history, lambda o: not o.answered)
    began = silent[0].at if unanswered_since is None else min(unanswered_since, silent[0].at)
    silent_for = last.at - began
    if silent_for < s.hang_after_s:
        return Judgement(Verdict.SUSPECT, f"no answer for {silent_for:.0f} s: hung or busy?")
    window = [o for o in history if o.at >= last.at - s.hang_after_s]
    first = window[0]
    cpu = (last.cpu_s - first.cpu_s) if last.cpu_s is not None and first.cpu_s is not None else 0
    out = last.output - first.output
    span = max(last.at - first.at, 1e-9)
    if cpu >= BUSY_CPU_SHARE * span or out > 0:
        work = f"CPU +{cpu:.1f} s, output +{out} bytes in {span:.0f} s"
        if silent_for >= s.unresponsive_max_s:
            return Judgement(Verdict.HUNG, f"no answer for {silent_for:.0f} s although working "
                             f"({work}); the limit is unresponsive_max_s")
        return Judgement(Verdict.BUSY, f"busy: no answer for {silent_for:.0f} s, but working "
                         f"({work})")
    return Judgement(Verdict.HUNG, f"no answer for {silent_for:.0f} s, no CPU time, no output: "
                     "deadlocked")


def _trailing(history: Sequence[Observation], pred: Callable[[Observation], bool]
              ) -> list[Observation]:
    """The observations at the end of ``history`` for which ``pred`` holds."""
    out: list[Observation] = []
    for o in reversed(history):
        if not pred(o):
            break
        out.append(o)
    return out[::-1]
