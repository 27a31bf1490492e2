"""The real Supervisor on a fake runtime (tests/support/fakeruntime.py): start order, crash,
hang, crash loop, backoff, unfixable exits, start deadlines, reload, shutdown. Fake clock, fake
processes: no subprocess, no sleep."""

from __future__ import annotations

import signal

from fakeruntime import FAST, Scenario, retag, spec

from mlx_stack.config.plan import Plan, ServiceKind
from mlx_stack.contract.commands import Action
from mlx_stack.errors import ConfigError
from mlx_stack.supervisor.states import ServiceState

S = ServiceState
EMB = ServiceKind.EMBEDDINGS
PROXY = ServiceKind.PROXY


def test_model_servers_start_first_and_the_proxy_once_one_is_ready(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), spec("embeddings", EMB))
    sc.rt.health["standard"] = sc.rt.health["embeddings"] = "fail"  # still loading
    sc.run(1.0)
    assert sc.state("standard") is S.STARTING and sc.state("proxy") is S.STOPPED
    sc.rt.health["embeddings"] = "ok"
    sc.until(lambda: sc.state("proxy") is S.STARTING, what="proxy starts")
    assert sc.state("embeddings") is S.READY and sc.state("standard") is S.STARTING
    sc.rt.health["standard"] = "ok"
    sc.until(sc.all_ready, what="all ready")
    snap = sc.snapshot()
    assert {s.name: s.state for s in snap.services} == dict.fromkeys(
        ["standard", "embeddings", "proxy"], "ready")
    assert snap.pid == 4242 and snap.warnings == ()


def test_a_crash_is_restarted_at_once_and_recorded(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    sc.until(sc.all_ready)
    first = sc.rt.child("standard")
    first.exit(1)
    took = sc.until(lambda: sc.state("standard") is S.READY
                    and sc.rt.child("standard") not in (None, first), what="back")
    assert took < 2.0  # the first restart after a healthy run has no delay
    m = sc.sup.services["standard"]
    assert m.restarts == 1 and m.last_exit is not None and m.last_exit.code == 1
    assert first.finished  # its group was cleaned
    assert "ready -> backoff (exit code 1; restarting in 0.0 s)" in sc.rt.log("standard").text
    assert sc.rt.child("proxy") is sc.rt.children[1]  # nothing else restarted


def test_a_hung_service_is_killed_after_the_threshold_and_restarted(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    sc.until(sc.all_ready)
    hung = sc.rt.child("standard")
    sc.rt.health["standard"] = "hang"
    sc.until(lambda: sc.state("standard") is S.UNHEALTHY, what="unhealthy")
    sc.until(lambda: not hung.alive, what="killed")
    assert hung.signals == [signal.SIGKILL]  # a hung process gets no grace
    sc.rt.health["standard"] = "ok"
    sc.until(lambda: sc.state("standard") is S.READY, what="back")
    assert "hung: 2 failed probes in a row (ReadTimeout)" in sc.rt.log("standard").text
    assert sc.sup.services["standard"].restarts == 1


def test_a_crash_loop_ends_in_fatal_and_restart_clears_it(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), spec("fast"))
    delays = []
    for _ in range(FAST.crashloop_restarts):
        sc.until(lambda: sc.rt.child("standard") is not None, what="running")
        sc.rt.child("standard").exit(1)
        sc.tick()
        m = sc.sup.services["standard"]
        if m.state is S.BACKOFF:
            delays.append(round(m.next_start_at - sc.rt.now + sc.TICK, 1))
    assert sc.state("standard") is S.FATAL
    assert delays == [0.0, 1.0, 2.0]  # immediate, then doubling from backoff_initial_s
    reason = sc.sup.services["standard"].reason
    assert "crash loop: 4 failures within 120 s" in reason
    assert "mlx-stack restart standard" in reason
    assert sc.state("fast") is S.READY  # the other tier never noticed
    answer = sc.command(Action.RESTART, "standard")
    assert answer.ok
    sc.until(lambda: sc.state("standard") is S.READY, what="restarted after fatal")


def test_backoff_starts_afresh_after_a_stable_run(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    for _ in range(2):
        sc.until(lambda: sc.state("standard") is S.READY)
        sc.rt.child("standard").exit(1)
        sc.tick()
    assert sc.sup.services["standard"].consecutive_failures == 2
    sc.until(lambda: sc.state("standard") is S.READY)
    sc.run(FAST.stable_after_s + 1)
    assert sc.sup.services["standard"].consecutive_failures == 0
    sc.rt.child("standard").exit(1)
    sc.tick()
    m = sc.sup.services["standard"]
    assert m.state is S.BACKOFF and m.next_start_at <= sc.rt.now  # immediate again


def test_an_unfixable_exit_during_start_is_fatal_at_once(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    sc.rt.health["standard"] = "fail"
    sc.until(lambda: sc.rt.child("standard") is not None)
    sc.rt.child("standard").exit(2)
    sc.tick()
    m = sc.sup.services["standard"]
    assert m.state is S.FATAL and m.restarts == 0
    assert "restarting cannot fix" in m.reason
    sc.run(5)
    assert len([c for c in sc.rt.children if c.name == "standard"]) == 1


def test_the_start_deadline_extends_while_the_log_grows(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), spec("fast"))
    sc.rt.health["standard"] = sc.rt.health["fast"] = "fail"  # both still "loading"
    sc.until(lambda: sc.rt.child("standard") is not None and sc.rt.child("fast") is not None)
    loading, silent = sc.rt.child("standard"), sc.rt.child("fast")
    for _ in range(150):  # 15 fake seconds: past start_timeout_s (10)
        sc.rt.log("standard").write_line(b"loading weights...")
        sc.tick()
    assert loading.alive and sc.state("standard") is S.STARTING
    assert not silent.alive and silent.signals == [signal.SIGKILL]
    assert "not ready after 10 s" in sc.rt.log("fast").text


def test_missing_weights_are_fatal_and_the_rest_runs(tmp_path):
    sc = Scenario(tmp_path, spec("embeddings", EMB),
                  missing={"standard": "standard: weights of x are not here; mlx-stack pull x"})
    sc.until(lambda: sc.state("embeddings") is S.READY and sc.state("proxy") is S.READY)
    assert sc.state("standard") is S.FATAL
    assert "mlx-stack pull x" in sc.sup.services["standard"].reason


def test_a_port_held_by_another_program_is_fatal_with_its_holder(tmp_path):
    s = spec("standard")
    sc = Scenario(tmp_path, s, spec("fast"))
    sc.rt.taken_ports[s.port] = "pid 77 (nginx)"
    sc.until(lambda: sc.state("fast") is S.READY)
    assert sc.state("standard") is S.FATAL
    assert f"port {s.port} is held by pid 77 (nginx)" in sc.sup.services["standard"].reason


def test_a_program_that_cannot_run_is_fatal(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), spec("fast"))
    sc.rt.fail_spawn["standard"] = FileNotFoundError(2, "No such file or directory")
    sc.until(lambda: sc.state("fast") is S.READY)
    assert sc.state("standard") is S.FATAL
    assert "cannot run python: No such file or directory" in sc.sup.services["standard"].reason


def test_a_reload_restarts_what_changed_adds_and_removes(tmp_path):
    std, fast, emb = spec("standard"), spec("fast"), spec("embeddings", EMB)
    sc = Scenario(tmp_path, std, fast)
    sc.until(sc.all_ready)
    before = sc.pids()
    proxy = sc.current_plan.proxy
    sc.plan = Plan((std, retag(fast, "--v2"), emb), proxy, {})
    sc.sup.reload_requested.set()
    sc.until(lambda: sc.all_ready() and sc.pids()["fast"] != before["fast"], what="applied")
    after = sc.pids()
    assert after["standard"] == before["standard"] and after["proxy"] == before["proxy"]
    assert after["embeddings"] is not None
    sc.plan = Plan((fast_v2 := retag(fast, "--v2"), emb), proxy, {})  # standard removed
    sc.sup.reload_requested.set()
    sc.until(lambda: sc.state("standard") is S.STOPPED, what="removed")
    assert sc.pids()["fast"] == after["fast"] and fast_v2.fingerprint
    assert sc.rt.children[0].signals == [signal.SIGTERM]


def test_an_invalid_reload_changes_nothing_and_is_shown(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    sc.until(sc.all_ready)
    before = sc.pids()
    sc.plan = ConfigError("stack.yaml", ["stack.yaml:3: tiers.fast.port: expected integer"])
    sc.sup.reload_requested.set()
    sc.run(1)
    assert sc.pids() == before and sc.all_ready()
    assert "tiers.fast.port" in (sc.snapshot().stack_error or "")


def test_shutdown_stops_the_proxy_first_and_kills_a_stubborn_child(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), spec("embeddings", EMB))
    sc.until(sc.all_ready)
    proxy, std, emb = sc.rt.child("proxy"), sc.rt.child("standard"), sc.rt.child("embeddings")
    std.ignores_sigterm = True
    sc.sup.stop_requested.set()
    sc.tick()
    assert proxy.signals == [signal.SIGTERM] and std.signals == [] and emb.signals == []
    took = sc.until(lambda: not any(c.alive for c in (proxy, std, emb)), what="stopped")
    assert std.signals == [signal.SIGTERM, signal.SIGKILL] and emb.signals == [signal.SIGTERM]
    assert FAST.stop_timeout_s <= took < FAST.stop_timeout_s + 1
    assert not sc.sup.tick()  # the loop reports it is done
    assert {s.state for s in sc.snapshot().services} == {"stopped"}
