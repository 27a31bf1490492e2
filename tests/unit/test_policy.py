"""The watchdog's decisions and its state table, as tables (no processes, no clocks)."""

from __future__ import annotations

import pytest

from mlx_stack.supervisor.policy import (
    WatchSettings,
    backoff_delay,
    exit_is_unfixable,
    is_crash_loop,
    should_reset_failures,
    start_deadline,
)
from mlx_stack.supervisor.states import IllegalTransition, ServiceState, check_transition

S = WatchSettings(backoff_initial_s=1, backoff_max_s=60, crashloop_restarts=3,
                  crashloop_window_s=100, stable_after_s=300, start_timeout_s=120,
                  start_timeout_max_s=1800)


@pytest.mark.parametrize(("n", "delay"), [(1, 0), (2, 1), (3, 2), (4, 4), (7, 32), (8, 60),
                                          (50, 60)])
def test_backoff_is_immediate_once_then_doubles_and_is_capped(n, delay):
    assert backoff_delay(n, S) == delay


@pytest.mark.parametrize(
    ("times", "now", "loop"),
    [([0, 10, 20], 30, True), ([0, 10], 30, False), ([0, 10, 20], 150, False),
     ([0, 90, 95, 99], 120, True)],
)
def test_crash_loop_window(times, now, loop):
    assert is_crash_loop(times, now, S) is loop


@pytest.mark.parametrize(("since", "now", "reset"), [(None, 1000, False), (0, 299, False),
                                                      (0, 300, True)])
def test_failures_reset_after_a_stable_period(since, now, reset):
    assert should_reset_failures(since, now, S) is reset


@pytest.mark.parametrize(
    ("started", "progress", "deadline"),
    [(0, 0, 120), (0, 500, 620), (0, 1750, 1800)],  # progress extends it, up to the cap
)
def test_start_deadline_extends_with_progress(started, progress, deadline):
    assert start_deadline(started, progress, S) == deadline


@pytest.mark.parametrize(("code", "during_start", "unfixable"),
                         [(2, True, True), (3, True, True), (2, False, False), (1, True, False),
                          (-9, True, False), (127, True, True)])
def test_unfixable_exits(code, during_start, unfixable):
    assert exit_is_unfixable(code, during_start) is unfixable


@pytest.mark.parametrize(("old", "new"), [
    (ServiceState.STOPPED, ServiceState.READY),
    (ServiceState.FATAL, ServiceState.READY),
    (ServiceState.BACKOFF, ServiceState.READY),
    (ServiceState.STOPPED, ServiceState.STOPPING),
])
def test_illegal_transitions_raise(old, new):
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_every_state_can_reach_stopped():
    """No state is a trap: from each, a path of legal moves leads back to STOPPED."""
    from mlx_stack.supervisor.states import TRANSITIONS

    for start in ServiceState:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert ServiceState.STOPPED in seen or start is ServiceState.STOPPED, start


# ----- hung or busy: judge_hang as a table ---------------------------------------------------

H = WatchSettings(failure_threshold=3, hang_after_s=6, unresponsive_max_s=600)


def obs(spec: str, cpu_per_s: float = 0.0, out_per_s: int = 0, start: float = 0.0):
    """One observation per second from a string: '.' answered ok, 'x' answered wrongly,
    '-' no answer, 'S' stopped (no answer)."""
    from mlx_stack.supervisor.policy import Observation

    return [Observation(at=start + i, answered=c in ".x", alive=c == ".", stopped=c == "S",
                        cpu_s=cpu_per_s * i, output=out_per_s * i)
            for i, c in enumerate(spec)]


@pytest.mark.parametrize(
    ("history", "verdict", "words"),
    [
        (obs(""), "ok", ""),
        (obs("....."), "ok", ""),
        (obs("....S"), "suspect", "no answer"),  # stopped once: a debugger attaching?
        (obs("...SS"), "hung", "stopped"),
        (obs("..x"), "suspect", "1/3"),
        (obs(".xxx"), "broken", "failed 3 times"),
        (obs("x.xx"), "suspect", "2/3"),  # not in a row
        (obs("..---"), "suspect", "no answer for 2 s"),
        (obs("..-------"), "hung", "deadlocked"),  # 6 s silent, no CPU, no output
        (obs("..-------", cpu_per_s=0.01), "hung", "deadlocked"),  # 1% of a core is idle noise
        (obs("..-------", cpu_per_s=0.9), "busy", "CPU +5.4 s"),
        (obs("..-------", out_per_s=80), "busy", "output +480 bytes"),
        (obs("..-----------", cpu_per_s=0.5), "busy", "no answer for 10 s"),
        (obs("-" * 8, cpu_per_s=1.0, start=1000), "busy", "working"),
    ],
)
def test_judge_hang_tells_hung_from_busy(history, verdict, words):
    from mlx_stack.supervisor.policy import judge_hang

    j = judge_hang(history, H)
    assert j.verdict.value == verdict, j
    assert words in j.reason


def test_a_busy_service_is_hung_after_unresponsive_max_s():
    from mlx_stack.supervisor.policy import judge_hang

    history = obs("-" * 20, cpu_per_s=1.0, start=1000)
    assert judge_hang(history, H, unanswered_since=500).verdict.value == "busy"  # 519 s
    j = judge_hang(history, H, unanswered_since=400)  # 619 s silent
    assert j.verdict.value == "hung" and "unresponsive_max_s" in j.reason
