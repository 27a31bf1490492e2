"""No input stops the supervisor: every command, good and bad, every failed write, a bug while
stepping one service, a hostile stack file. The real Supervisor and the real command mailbox
(files in a temp folder) on the fake runtime: no subprocess, no sleep."""

from __future__ import annotations

import errno
import json
import signal
import time

import pytest
from fakeruntime import Scenario, spec
from stackenv import write_stack

from mlx_stack.config.plan import ServiceKind, load_plan
from mlx_stack.contract.commands import Action, ErrorCode, Mailbox
from mlx_stack.supervisor.states import ServiceState

S = ServiceState


@pytest.fixture
def ready(tmp_path) -> Scenario:
    sc = Scenario(tmp_path, spec("standard"), spec("embeddings", ServiceKind.EMBEDDINGS))
    sc.until(sc.all_ready, what="ready")
    return sc


def test_every_action_works_and_is_answered(ready):
    sc = ready
    pids = sc.pids()
    a = sc.command(Action.STOP, "standard")
    assert a.ok and a.result == "stop standard" and a.services == ("standard", "embeddings",
                                                                    "proxy")
    sc.until(lambda: sc.state("standard") is S.STOPPED)
    assert sc.command(Action.START, "standard").ok
    sc.until(lambda: sc.state("standard") is S.READY)
    assert sc.command(Action.RESTART, "embeddings").ok
    sc.until(lambda: sc.state("embeddings") is S.READY and sc.pids()["embeddings"]
             not in (None, pids["embeddings"]))
    assert sc.command(Action.RELOAD).result == "reloaded"
    assert sc.command(Action.RESTART).ok  # every service
    sc.until(lambda: sc.all_ready() and all(
        sc.pids()[n] != pids[n] for n in pids), what="all restarted")


@pytest.mark.parametrize("target", ["nosuch", "standrad"])
def test_an_unknown_service_is_an_error_answer_naming_the_services(ready, target):
    sc = ready
    pids = sc.pids()
    for action in (Action.RESTART, Action.STOP, Action.START):
        a = sc.command(action, target)
        assert a.error is not None and a.error.code is ErrorCode.UNKNOWN_SERVICE
        assert f"no service named {target!r}" in a.error.message
        assert "services: standard, embeddings, proxy" in a.error.message
    if target == "standrad":
        assert "did you mean 'standard'" in sc.command(Action.STOP, target).error.message
    sc.run(1)
    assert sc.pids() == pids and sc.all_ready()


GARBAGE = {
    "not-json.json": (b"restart everything please", ErrorCode.MALFORMED, "not JSON"),
    "array.json": (b'["restart", "standard"]', ErrorCode.MALFORMED, "expected a JSON object"),
    "number.json": (b"42", ErrorCode.MALFORMED, "expected a JSON object"),
    "action.json": (b'{"action": "explode"}', ErrorCode.UNKNOWN_ACTION, "unknown action"),
    "noaction.json": (b'{"target": "standard"}', ErrorCode.MALFORMED, "'action' must be"),
    "field.json": (b'{"action": "stop", "service": "x"}', ErrorCode.MALFORMED, "unknown field"),
    "target.json": (b'{"action": "stop", "target": ["standard"]}', ErrorCode.MALFORMED,
                    "'target' must be"),
    "binary.json": (bytes(range(256)) * 4, ErrorCode.MALFORMED, "not JSON"),
    "big.json": (b'{"action": "stop", "target": "' + b"x" * 70000 + b'"}',
                 ErrorCode.MALFORMED, "larger than"),
    "deep.json": (b"[" * 60000, ErrorCode.MALFORMED, "not JSON"),
    "we ird name!.json": (b"{}", ErrorCode.MALFORMED, "'action' must be"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_a_garbage_command_file_is_answered_removed_and_harmless(ready, name):
    sc = ready
    body, code, words = GARBAGE[name]
    pids = sc.pids()
    path = sc.drop(name, body)
    sc.tick()
    assert not path.exists()  # removed: the next supervisor will not meet it either
    stem = name.removesuffix(".json")
    cid = stem if " " not in stem else "bad-we_ird_name_"
    answer = sc.answer(cid)
    assert answer.error is not None and answer.error.code is code, answer
    assert words in answer.error.message
    assert any("refused a command" in line for line in sc.said)
    sc.run(2)
    assert sc.pids() == pids and sc.all_ready()


def test_a_folder_named_like_a_command_is_moved_aside(ready):
    sc = ready
    (sc.paths.commands / "dir.json").mkdir()
    (sc.paths.commands / "dir.json" / "inside").write_text("x")
    sc.run(1)
    assert not (sc.paths.commands / "dir.json").exists()
    assert (sc.paths.commands / "dir.json.rejected").is_dir()
    assert sc.answer("dir").error.code is ErrorCode.MALFORMED
    assert sc.all_ready()


def test_a_fifo_or_a_link_named_like_a_command_neither_blocks_nor_is_followed(ready, tmp_path):
    """A FIFO would block the loop in open(); a link would make it read another file."""
    import os

    sc = ready
    os.mkfifo(sc.paths.commands / "fifo.json")
    target = tmp_path / "elsewhere.json"
    target.write_text('{"action": "stop", "target": "standard", "id": "link"}')
    (sc.paths.commands / "link.json").symlink_to(target)
    sc.run(1)
    for cid in ("fifo", "link"):
        assert not (sc.paths.commands / f"{cid}.json").exists()
        error = sc.answer(cid).error
        assert error is not None and "not a regular file" in error.message
    assert target.exists() and sc.all_ready()  # the link's target was not obeyed


def test_a_command_file_that_vanishes_mid_read_gets_an_answer(tmp_path):
    box = Mailbox(tmp_path)
    got = box._take(tmp_path / "abc.json")  # listed, then gone before it was opened
    assert got.command is None and got.error is not None
    assert "vanished" in got.error.message and got.id == "abc"


def test_a_garbage_file_left_before_start_troubles_no_new_supervisor(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), start=False)
    sc.drop("left.json", b"\x00\x01garbage")
    sc.sup.load_initial()
    sc.until(sc.all_ready, what="ready despite the file")
    assert not (sc.paths.commands / "left.json").exists()


def test_reload_by_command_waits_for_the_outcome(ready):
    from mlx_stack.errors import ConfigError

    sc = ready
    sc.plan = ConfigError("stack.yaml", ["stack.yaml:2: tiers: expected a mapping"])
    a = sc.command(Action.RELOAD)
    assert a.error is not None and a.error.code is ErrorCode.STACK_INVALID
    assert "tiers: expected a mapping" in a.error.message
    assert sc.all_ready()


def test_a_failed_snapshot_write_is_a_warning_and_is_retried(ready):
    sc = ready
    pids = sc.pids()
    sc.rt.fail_writes[sc.paths.state_file] = errno.ENOSPC
    sc.run(5)  # 50 ticks, each wanting to write
    assert sc.pids() == pids and sc.all_ready()
    warnings = [line for line in sc.said if "warning: cannot write" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]  # once a minute
    sc.rt.children[0].exit(1)  # life goes on: a crash is still handled
    sc.until(lambda: sc.state("standard") is S.READY and sc.pids()["standard"] != pids[
        "standard"])
    del sc.rt.fail_writes[sc.paths.state_file]
    sc.run(1.5)
    snap = sc.snapshot()
    assert any("No space left on device" in w for w in snap.warnings)
    assert snap.service("standard").restarts == 1
    assert any("is written again" in line for line in sc.said)


def test_a_failed_log_write_and_a_failed_answer_are_warnings(ready):
    sc = ready
    sc.rt.log("standard").error = "cannot write standard.log: Permission denied"
    sc.rt.fail_writes[sc.paths.commands / "x1.answer"] = errno.EACCES
    sc.drop("x1.json", b'{"action": "restart", "target": "nosuch"}')
    sc.run(3)
    warnings = sc.snapshot().warnings
    assert any("standard.log: Permission denied" in w for w in warnings)
    assert any("cannot answer command x1: Permission denied" in w for w in warnings)
    assert sc.all_ready()


def test_a_failed_proxy_config_write_backs_off_and_recovers(tmp_path):
    proxy = spec("proxy", ServiceKind.PROXY)
    from dataclasses import replace

    cfg = tmp_path / "run" / "litellm.yaml"
    proxy = replace(proxy, config_file=(cfg, "model_list: []\n"))
    sc = Scenario(tmp_path, spec("standard"), proxy)
    sc.rt.fail_writes[cfg] = errno.ENOSPC
    sc.until(lambda: sc.state("proxy") is S.BACKOFF, what="backoff")
    assert "cannot write" in sc.sup.services["proxy"].reason
    del sc.rt.fail_writes[cfg]
    sc.until(lambda: sc.state("proxy") is S.READY, what="recovered")
    assert sc.rt.files[cfg] == "model_list: []\n"


def test_a_bug_while_stepping_one_service_marks_it_and_the_others_go_on(tmp_path):
    sc = Scenario(tmp_path, spec("standard"), spec("fast"))
    sc.rt.health["standard"] = sc.rt.health["fast"] = "fail"  # starting: memory is read
    sc.rt.boom["standard"] = KeyError("a bug")
    sc.run(2)
    sc.rt.health["fast"] = "ok"
    sc.until(lambda: sc.state("fast") is S.READY and sc.state("proxy") is S.READY)
    snap = sc.snapshot()
    assert "internal error in service standard: KeyError" in snap.service("standard").fault
    assert snap.service("fast").fault == ""
    tracebacks = [line for line in sc.said if "Traceback" in line]
    assert len(tracebacks) == 1  # logged once, not every tick
    del sc.rt.boom["standard"]
    sc.rt.health["standard"] = "ok"
    sc.until(lambda: sc.state("standard") is S.READY)
    assert sc.snapshot().service("standard").fault  # kept a while: status can show it
    sc.run(61)
    assert sc.snapshot().service("standard").fault == ""


def test_a_prober_that_raises_is_a_failed_probe(ready):
    sc = ready
    sc.rt.health["standard"] = "raise"
    sc.until(lambda: sc.state("standard") is S.UNHEALTHY)
    assert "probe error: RuntimeError: prober bug" in sc.sup.services["standard"].reason


def test_losing_the_lock_stops_the_supervisor(ready):
    class Lost:
        path = ready.paths.lock_file

        def still_ours(self) -> bool:
            return False

    sc = ready
    sc.sup.lock = Lost()  # type: ignore[assignment]
    sc.until(lambda: sc.sup.shutting_down, what="shutting down")
    assert any("lost the stack lock" in line for line in sc.said)
    sc.until(lambda: not sc.sup.tick(), what="done")


def test_a_crash_of_the_loop_stops_children_in_order_and_logs_the_traceback(ready):
    sc = ready
    children = {n: sc.rt.child(n) for n in ("standard", "embeddings", "proxy")}
    calls = 0
    real_tick = sc.sup.tick

    def tick() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_tick()

    sc.sup.tick = tick  # type: ignore[method-assign]
    sc.sup.load_initial = lambda: None  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        sc.sup.run(sleep=sc.rt.advance)
    assert all(c.signals[:1] == [signal.SIGTERM] and not c.alive for c in children.values())
    log = "\n".join(sc.said)
    assert "internal error in the supervisor loop: KeyboardInterrupt" in log
    assert "Traceback" in log and "stopping every service before exiting" in log


def test_an_alias_bomb_saved_over_the_stack_file_is_refused_fast(tmp_path):
    env = write_stack(tmp_path / "home", None)
    sc = Scenario(env.home, spec("unused"), start=False)
    sc.sup.load_plan = lambda: load_plan(sc.paths)  # the real stack file, catalog and key
    sc.sup.load_initial()
    sc.until(sc.all_ready, what="real plan ready")
    pids = sc.pids()
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for x, y in zip("bcdefghi", "abcdefgh", strict=True):
        bomb.append(f"{x}: &{x} [{','.join(['*' + y] * 9)}]")
    text = "\n".join(bomb) + "\n"
    assert len(text) < 400
    env.home.joinpath("stack.yaml").write_text(text)
    t0 = time.monotonic()
    a = sc.command(Action.RELOAD)
    took = time.monotonic() - t0
    assert took < 1.0
    assert a.error is not None and "expands to more than 100,000 values" in a.error.message
    assert sc.pids() == pids and sc.all_ready()
    assert "nested aliases" in (sc.snapshot().stack_error or "")
    env.home.joinpath("stack.yaml").write_bytes(b"x" * (50 * 2**20))  # 50 MB
    t0 = time.monotonic()
    a = sc.command(Action.RELOAD)
    assert time.monotonic() - t0 < 1.0 and "larger than 262,144 bytes" in a.error.message
    assert json.loads(sc.rt.files[sc.paths.state_file])["supervisor"]["stack_error"]


def test_answers_nobody_collected_are_swept(tmp_path):
    import os

    box = Mailbox(tmp_path)
    old, fresh = tmp_path / "old.answer", tmp_path / "new.answer"
    old.write_text("{}")
    fresh.write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    box.sweep(time.time())
    assert not old.exists() and fresh.exists()
