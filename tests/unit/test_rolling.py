"""Rolling replacement of a tier's replicas (mlx_stack/supervisor/rolling.py): the pure
decision as a table, then the real Supervisor on the fake runtime (tests/support/
fakeruntime.py): a reload or `restart embeddings` replaces replicas one at a time, each out of
the route before it is signalled, never two down at once; a single replica is addressable; a
replacement that cannot start stops the roll. Fake clock, fake processes: no subprocess."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest
from fakeruntime import Scenario, retag, spec

from mlx_stack.config.plan import Plan, ServiceKind, ServiceSpec
from mlx_stack.contract.commands import Action, ErrorCode
from mlx_stack.supervisor.rolling import DRAIN_S, Phase, Roll, Step, StepKind, next_step
from mlx_stack.supervisor.states import ServiceState

S = ServiceState
K = StepKind
EMB = ServiceKind.EMBEDDINGS
MEMBERS = ("embeddings", "embeddings-2")


@pytest.mark.parametrize(("queue", "current", "phase", "states", "now", "expected"), [
    # Nothing left: done.
    ([], None, Phase.DRAIN, {}, 0.0, Step(K.DONE)),
    # Its turn, the other replica serves: take it out of the route first.
    (["embeddings"], None, Phase.DRAIN, {"embeddings": S.READY, "embeddings-2": S.READY},
     0.0, Step(K.DRAIN, "embeddings")),
    # Its turn, nobody else serves: nothing to drain to, replace at once.
    (["embeddings"], None, Phase.DRAIN, {"embeddings": S.READY, "embeddings-2": S.BACKOFF},
     0.0, Step(K.REPLACE, "embeddings")),
    # Not running (backoff, fatal, stopped): just take the new definition.
    (["embeddings-2"], None, Phase.DRAIN, {"embeddings": S.READY, "embeddings-2": S.FATAL},
     0.0, Step(K.SKIP, "embeddings-2")),
    # Draining: wait until the drain time is over, then replace.
    ([], "embeddings", Phase.DRAIN, {"embeddings": S.READY}, 4.0, Step(K.WAIT)),
    ([], "embeddings", Phase.DRAIN, {"embeddings": S.READY}, 5.0, Step(K.REPLACE, "embeddings")),
    # Replacing: wait while it stops and starts; ready -> put back; fatal -> stop the roll.
    ([], "embeddings", Phase.REPLACE, {"embeddings": S.STOPPING}, 9.0, Step(K.WAIT)),
    ([], "embeddings", Phase.REPLACE, {"embeddings": S.BACKOFF}, 9.0, Step(K.WAIT)),
    ([], "embeddings", Phase.REPLACE, {"embeddings": S.STARTING}, 9.0, Step(K.WAIT)),
    (["embeddings-2"], "embeddings", Phase.REPLACE, {"embeddings": S.READY}, 9.0,
     Step(K.PUT_BACK, "embeddings")),
    (["embeddings-2"], "embeddings", Phase.REPLACE, {"embeddings": S.FATAL}, 9.0,
     Step(K.ABORT, "embeddings")),
    (["embeddings-2"], "embeddings", Phase.REPLACE, {"embeddings": S.STOPPED}, 9.0,
     Step(K.ABORT, "embeddings")),
])
def test_next_step(queue, current, phase, states, now, expected):
    roll = Roll("embeddings", "test", list(queue), current, phase, drain_until=5.0)
    assert next_step(roll, states, MEMBERS, now) == expected


def replicas(n: int = 2, tag: str = "") -> tuple[ServiceSpec, ...]:
    names = ["embeddings", *(f"embeddings-{i}" for i in range(2, n + 1))]
    return tuple(replace(spec(name, EMB, tag), group="embeddings") for name in names)


class Watcher:
    """Ticks a scenario, checking on every tick what clients would see."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.drained_before_signal: dict[int, bool] = {}
        self.min_serving = 99

    def serving(self) -> list[str]:
        """Replicas the proxy would send a request to now (the snapshot's view)."""
        self.sc.sup.write_snapshot()
        snap = self.sc.snapshot()
        return [s.name for s in snap.services if s.group == "embeddings"
                and s.state == "ready" and s.in_route]

    def until(self, pred, within: float = 120.0) -> None:
        start = self.sc.rt.now
        while not pred():
            assert self.sc.rt.now - start < within, {
                n: (m.state.value, m.reason) for n, m in self.sc.sup.services.items()}
            before = {id(c): bool(c.signals) for c in self.sc.rt.children}
            drained = {m.record.pid for m in self.sc.sup.services.values()
                       if m.record is not None and not m.in_route}
            self.sc.tick()
            for c in self.sc.rt.children:
                if c.signals and not before.get(id(c), False):
                    self.drained_before_signal[c.record.pid] = c.record.pid in drained
            self.min_serving = min(self.min_serving, len(self.serving()))


def test_a_reload_that_changes_the_tier_replaces_replicas_one_at_a_time(tmp_path):
    sc = Scenario(tmp_path, *replicas(2))
    sc.until(sc.all_ready)
    before = sc.pids()
    sc.plan = Plan(replicas(2, "--new-model"), sc.current_plan.proxy, {})
    sc.sup.reload_requested.set()
    w = Watcher(sc)
    new = {s.name: s.fingerprint for s in sc.current_plan.model_servers}
    w.until(lambda: sc.all_ready() and all(
        sc.sup.services[n].spec.fingerprint == fp and sc.pids()[n] != before[n]
        for n, fp in new.items()) and not sc.sup.rolls.active)
    assert w.min_serving >= 1  # a replica served at every tick
    assert list(w.drained_before_signal.values()) == [True, True]  # each out of route first
    assert sc.pids()["proxy"] == before["proxy"]  # the proxy was left alone
    old = [c for c in sc.rt.children if c.record.pid in (before["embeddings"],
                                                         before["embeddings-2"])]
    assert all(c.signals == [signal.SIGTERM] for c in old)  # a graceful stop, no kill
    # The first replica was back (ready) before the second was touched.
    log = sc.rt.log("embeddings").text
    assert "out of the route, draining" in log and "replaced, back in the route" in log
    assert any("replacing embeddings, embeddings-2 one at a time" in x for x in sc.said)
    assert any("every replica replaced" in x for x in sc.said)


def test_the_drain_lasts_drain_s_before_the_replica_is_signalled(tmp_path):
    sc = Scenario(tmp_path, *replicas(2))
    sc.until(sc.all_ready)
    first = sc.rt.child("embeddings")
    assert sc.command(Action.RESTART, "embeddings").ok
    assert not sc.sup.services["embeddings"].in_route and first.signals == []
    snap = sc.snapshot()
    assert snap.service("embeddings").in_route is False  # what the proxy reads
    sc.run(DRAIN_S - 0.3)
    assert first.signals == []
    sc.run(0.5)
    assert first.signals == [signal.SIGTERM]


def test_restart_of_the_tier_rolls_every_replica_and_one_replica_is_addressable(tmp_path):
    sc = Scenario(tmp_path, *replicas(3))
    sc.until(sc.all_ready)
    w = Watcher(sc)
    before = sc.pids()
    answer = sc.command(Action.RESTART, "embeddings")
    assert answer.ok and "embeddings-1" in answer.services
    w.until(lambda: sc.all_ready() and not sc.sup.rolls.active)
    after = sc.pids()
    assert all(after[n] != before[n] for n in ("embeddings", "embeddings-2", "embeddings-3"))
    assert w.min_serving >= 2  # three replicas, one out at a time
    for target, changed in (("embeddings-2", "embeddings-2"), ("embeddings-1", "embeddings")):
        before = sc.pids()
        assert sc.command(Action.RESTART, target).ok
        sc.until(lambda: sc.all_ready() and not sc.sup.rolls.active, what=target)
        after = sc.pids()
        assert [n for n in after if after[n] != before[n]] == [changed]


def test_stop_and_start_of_the_tier_address_every_replica(tmp_path):
    sc = Scenario(tmp_path, *replicas(2), spec("standard"))
    sc.until(sc.all_ready)
    assert sc.command(Action.STOP, "embeddings").ok
    sc.until(lambda: sc.state("embeddings") is S.STOPPED and sc.state("embeddings-2")
             is S.STOPPED)
    assert sc.state("standard") is S.READY
    assert sc.command(Action.START, "embeddings").ok
    sc.until(sc.all_ready)
    bad = sc.command(Action.RESTART, "embeddings-9")
    assert bad.error is not None and bad.error.code is ErrorCode.UNKNOWN_SERVICE


def test_a_killed_replica_is_restarted_alone_and_the_other_keeps_serving(tmp_path):
    sc = Scenario(tmp_path, *replicas(2))
    sc.until(sc.all_ready)
    other = sc.pids()["embeddings-2"]
    sc.rt.child("embeddings").exit(-9)
    w = Watcher(sc)
    w.until(lambda: sc.all_ready() and sc.sup.services["embeddings"].restarts == 1)
    assert sc.pids()["embeddings-2"] == other and w.min_serving >= 1
    assert not sc.sup.rolls.active  # a crash is the watchdog's, not a roll


def test_a_replacement_that_cannot_start_stops_the_roll_and_the_rest_keep_serving(tmp_path):
    sc = Scenario(tmp_path, *replicas(2))
    sc.until(sc.all_ready)
    second = sc.pids()["embeddings-2"]
    sc.rt.fail_spawn["embeddings"] = FileNotFoundError(2, "No such file or directory")
    sc.plan = Plan(replicas(2, "--broken"), sc.current_plan.proxy, {})
    sc.sup.reload_requested.set()
    sc.until(lambda: sc.state("embeddings") is S.FATAL, what="first replica fails")
    sc.run(5.0)
    assert sc.state("embeddings-2") is S.READY and sc.pids()["embeddings-2"] == second
    assert sc.sup.services["embeddings-2"].pending_spec is not None  # not applied
    assert not sc.sup.rolls.active
    assert any("rolling replacement stopped: embeddings is fatal" in x for x in sc.said)


def test_an_edit_undone_before_its_turn_is_dropped(tmp_path):
    sc = Scenario(tmp_path, *replicas(2))
    sc.until(sc.all_ready)
    old_plan = sc.current_plan
    sc.plan = Plan(replicas(2, "--v2"), old_plan.proxy, {})
    sc.sup.reload_requested.set()
    sc.tick()
    assert sc.sup.rolls.pending("embeddings-2")
    sc.plan = old_plan
    sc.sup.reload_requested.set()
    sc.tick()
    assert not sc.sup.rolls.pending("embeddings-2")
    assert sc.sup.services["embeddings-2"].pending_spec is None


def test_a_tier_of_one_server_restarts_as_before(tmp_path):
    one = replace(spec("embeddings", EMB), group="embeddings")
    sc = Scenario(tmp_path, one)
    sc.until(sc.all_ready)
    first = sc.rt.child("embeddings")
    sc.plan = Plan((retag(one, "--v2"),), sc.current_plan.proxy, {})
    sc.sup.reload_requested.set()
    sc.tick()
    assert first.signals == [signal.SIGTERM] and not sc.sup.rolls.active  # at once
    bad = sc.command(Action.RESTART, "embeddings-1")  # no alias without replicas
    assert bad.error is not None and bad.error.code is ErrorCode.UNKNOWN_SERVICE


def test_up_of_the_tier_starts_every_replica(tmp_path):
    sc = Scenario(tmp_path, *replicas(2), spec("standard"), start=False)
    sc.sup.only = {"embeddings"}
    sc.sup.load_initial()
    sc.until(lambda: sc.state("embeddings") is S.READY and sc.state("embeddings-2") is S.READY)
    assert sc.state("standard") is S.STOPPED
