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


def test_a_stopped_service_is_hung_at_once_and_replaced(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    sc.until(sc.all_ready)
    stopped = sc.rt.child("standard")
    stopped.stopped = True  # SIGSTOP: alive, port open, answers nothing
    took = sc.until(lambda: not stopped.alive, what="killed")
    assert took <= 2.5  # seen stopped twice, liveness_interval_s apart
    assert stopped.signals == [signal.SIGKILL]  # a hung process gets no grace
    sc.until(lambda: sc.state("standard") is S.READY, what="replaced")
    assert "hung: stopped (SIGSTOP or a debugger)" in sc.rt.log("standard").text
    assert sc.sup.services["standard"].restarts == 1


def test_a_deadlocked_service_is_replaced_after_hang_after_s(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    sc.until(sc.all_ready)
    dead = sc.rt.child("standard")
    sc.rt.health["standard"] = sc.rt.live["standard"] = "hang"  # no answer, no CPU, no output
    took = sc.until(lambda: not dead.alive, what="killed")
    assert FAST.hang_after_s <= took <= FAST.hang_after_s + 2 * FAST.liveness_timeout_s + 1
    sc.rt.health["standard"] = sc.rt.live["standard"] = "ok"
    sc.until(lambda: sc.state("standard") is S.READY, what="replaced")
    assert "no CPU time, no output: deadlocked" in sc.rt.log("standard").text


def test_a_busy_service_that_answers_nothing_but_works_is_never_killed(tmp_path):
    sc = Scenario(tmp_path, spec("standard"))
    sc.until(sc.all_ready)
    busy = sc.rt.child("standard")
    sc.rt.health["standard"] = sc.rt.live["standard"] = "hang"
    for _ in range(20 * 60 * 2):  # 20 fake minutes, burning CPU all along
        busy.cpu_s += 0.4
        sc.tick(0.5)
    assert busy.alive and busy.signals == []
    assert sc.state("standard") is S.UNHEALTHY
    assert sc.sup.services["standard"].reason.startswith("busy: no answer for")
    sc.rt.health["standard"] = sc.rt.live["standard"] = "ok"  # its long work is done
    sc.until(lambda: sc.state("standard") is S.READY, what="ready again")
    assert sc.sup.services["standard"].restarts == 0


def test_output_counts_as_work_and_unresponsive_max_s_caps_it(tmp_path):
    from dataclasses import replace

    sc = Scenario(tmp_path, spec("standard"), settings=replace(FAST, unresponsive_max_s=120))
    sc.until(sc.all_ready)
    busy = sc.rt.child("standard")
    sc.rt.health["standard"] = sc.rt.live["standard"] = "hang"
    for _ in range(100 * 10):  # 100 fake s: only its log shows progress
        sc.rt.log("standard").write_line(b"step ...")
        sc.tick()
    assert busy.alive
    waited = 0.0
    while busy.alive and waited < 60:
        sc.rt.log("standard").write_line(b"step ...")
        sc.tick()
        waited += sc.TICK
    assert not busy.alive and 10 < waited <= 30, waited  # at 120 s of silence, not before
    assert "although working" in sc.rt.log("standard").text


def test_a_long_generation_is_busy_not_hung(tmp_path):
    """Measured on mlx_lm.server: during a long generation its /health answers in ~0.1 s while
    a real request may queue behind the generation. Such a tier stays ready, forever."""
    sc = Scenario(tmp_path, spec("standard"))
    sc.until(sc.all_ready)
    gen = sc.rt.child("standard")
    sc.rt.health["standard"] = "hang"  # the one-token probe times out (probe_timeout_s)
    sc.run(60 * 60, dt=0.5)  # an hour of fake time
    assert gen.alive and gen.signals == [] and sc.state("standard") is S.READY
    assert "busy: a real request took longer" in sc.sup.services["standard"].reason


def test_wrong_answers_are_broken_and_restarted(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), spec("fast"))
    sc.until(sc.all_ready)
    std, fast = sc.rt.child("standard"), sc.rt.child("fast")
    sc.rt.health["standard"] = "fail"  # real requests answered with HTTP 500
    sc.rt.live["fast"] = "fail"  # its health route says 503 (mlx_lm: generation thread died)
    sc.until(lambda: not std.alive and not fast.alive, what="both killed")
    assert "broken: 2 failed probes in a row (HTTP 500: boom)" in sc.rt.log("standard").text
    assert "broken: its health route failed 2 times in a row" in sc.rt.log("fast").text


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
