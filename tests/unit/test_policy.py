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
