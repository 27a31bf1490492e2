"""The watchdog with the real services: mlx_lm.server tiers, the embeddings server and LiteLLM,
supervised by a real `mlx-stack up`, with the watchdog's timers shortened in the stack file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator

import psutil
import pytest
from stackenv import StackEnv, write_stack

pytestmark = pytest.mark.e2e

WATCHDOG = """\
watchdog:
  probe_interval_s: 0.5
  probe_timeout_s: 3
  failure_threshold: 2
  backoff_initial_s: 0.2
  stop_timeout_s: 3
"""
SECOND_MODEL = """\
  - name: tiny-chat-b
    type: chat
    source: local/tiny-chat-b
    params_b: 0.001
    context_length: 512
    tier_hint: fast
    memory_mb: 50
    quantizations:
      - {{id: fp32, source: "path:{path}", memory_mb: 50}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model) -> Iterator[StackEnv]:
    env = write_stack(tmp_path_factory.mktemp("wd"), tiny_model)
    copy = tmp_path_factory.mktemp("models-b") / "tiny-chat-b"
    shutil.copytree(tiny_model, copy)
    with open(env.home / "catalog" / "tiny.yaml", "a") as f:
        f.write(SECOND_MODEL.format(path=copy))
    with open(env.home / "stack.yaml", "a") as f:
        f.write(WATCHDOG)
    try:
        env.cli("up", check=True, timeout=600)
        yield env
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()


def services(env: StackEnv) -> dict[str, dict]:
    return {s["name"]: s for s in env.status()["services"]}


def wait_for(env: StackEnv, pred, timeout: float = 90.0, what: str = "") -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = services(env)
        if pred(now):
            return now
        time.sleep(0.3)
    raise AssertionError(f"timed out: {what}: {services(env)}")


@pytest.mark.parametrize("name", ["standard", "embeddings", "proxy"])
def test_kill_9_of_each_service_type_comes_back_ready(stack, name):
    before = wait_for(stack, lambda s: all(x["state"] == "ready" for x in s.values()), what="ready")
    os.kill(before[name]["pid"], signal.SIGKILL)
    after = wait_for(stack, lambda s: s[name]["state"] == "ready" and s[name]["pid"] not in
                     (None, before[name]["pid"]), what=f"{name} back")
    assert after[name]["restarts"] == before[name]["restarts"] + 1
    assert after[name]["last_exit"] == "killed by SIGKILL"
    others = [n for n in after if n != name]
    assert all(after[n]["pid"] == before[n]["pid"] for n in others)  # nothing else restarted


def test_a_stopped_tier_is_detected_as_hung_and_restarted(stack):
    before = wait_for(stack, lambda s: s["fast"]["state"] == "ready", what="fast ready")
    pid = before["fast"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        after = wait_for(stack, lambda s: s["fast"]["state"] == "ready" and s["fast"]["pid"] != pid,
                         what="hung tier restarted")
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    assert after["fast"]["restarts"] == before["fast"]["restarts"] + 1
    assert "hung" in stack.cli("logs", "fast", "-n", "200").stdout


def test_an_invalid_edit_leaves_the_running_stack_untouched(stack):
    path = stack.home / "stack.yaml"
    good = path.read_text()
    before = wait_for(stack, lambda s: all(x["state"] == "ready" for x in s.values()), what="ready")
    try:
        path.write_text(good.replace("model: tiny-chat\n", "model: [tiny-chat\n", 1))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not stack.status()["problem"]:
            time.sleep(0.3)
        st = stack.status()
        assert st["problem"] and "malformed YAML" in st["problem"]
        assert {n: s["pid"] for n, s in services(stack).items()} == {
            n: s["pid"] for n, s in before.items()}
    finally:
        path.write_text(good)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and stack.status()["problem"]:
        time.sleep(0.3)
    assert stack.status()["problem"] is None


def test_a_valid_edit_restarts_only_that_tier(stack):
    path = stack.home / "stack.yaml"
    before = wait_for(stack, lambda s: all(x["state"] == "ready" for x in s.values()), what="ready")
    text = path.read_text()
    fast_block = text.split("  fast:\n", 1)[1]
    path.write_text(text.replace("  fast:\n" + fast_block,
                                 "  fast:\n" + fast_block.replace("tiny-chat", "tiny-chat-b", 1)))
    after = wait_for(stack, lambda s: s["fast"]["model"] == "tiny-chat-b" and
                     s["fast"]["state"] == "ready" and s["fast"]["pid"] != before["fast"]["pid"],
                     what="fast on the new model")
    for name in ("standard", "embeddings", "proxy"):
        assert after[name]["pid"] == before[name]["pid"], name


def test_a_second_supervisor_of_the_same_stack_refuses_to_start(stack):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "mlx_stack.supervisor"], env=stack.env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert "another supervisor already runs this stack" in res.stderr
    assert all(s["state"] == "ready" for s in stack.status()["services"])


def test_killing_the_supervisor_takes_every_service_with_it_and_up_recovers(stack):
    state = stack.status()
    pids = [s["pid"] for s in state["services"]]
    import json

    sup = json.loads((stack.home / "run" / "state.json").read_text())["supervisor"]["pid"]
    os.kill(sup, signal.SIGKILL)
    deadline = time.monotonic() + 10

    def alive(p: int) -> bool:
        try:
            return psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "children outlived their supervisor"
    assert all(s["state"] == "stopped" for s in stack.status()["services"])
    stack.cli("up", check=True, timeout=600)
    assert all(s["state"] == "ready" for s in stack.status()["services"])


def test_up_foreground_runs_attached_and_stops_on_sigterm(tmp_path):
    """How launchd and systemd run it: attached, until SIGTERM; then nothing is left."""
    import subprocess

    from stackenv import MLX_STACK

    env = write_stack(tmp_path / "fg", None)
    proc = subprocess.Popen([*MLX_STACK, "up", "--foreground"], env=env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(env, lambda s: all(x["state"] == "ready" for x in s.values()), 300,
                 "foreground stack ready")
        pids = [s["pid"] for s in env.status()["services"]]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "every service stopped" in out
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                       for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        env.kill_everything()


def test_restart_command_restarts_and_waits_for_ready(stack):
    before = wait_for(stack, lambda s: s["standard"]["state"] == "ready", what="standard ready")
    res = stack.cli("restart", "standard", "--json", check=True, timeout=300)
    body = json.loads(res.stdout)
    assert body["restarted"] == ["standard"]
    assert {s["name"]: s["state"] for s in body["services"]}["standard"] == "ready"
    after = services(stack)
    assert after["standard"]["state"] == "ready"
    assert after["standard"]["pid"] != before["standard"]["pid"]
    assert after["embeddings"]["pid"] == before["embeddings"]["pid"]
    assert stack.cli("restart", "nosuch").returncode != 0


# --- no input stops the supervisor (the real CLI against the live stack) --------------------


def ready_pids(env: StackEnv) -> dict[str, int]:
    now = wait_for(env, lambda s: all(x["state"] == "ready" for x in s.values()), what="ready")
    return {n: s["pid"] for n, s in now.items()}


def supervisor_pid(env: StackEnv) -> int:
    return json.loads((env.home / "run" / "state.json").read_text())["supervisor"]["pid"]


def no_traceback(res) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr


@pytest.mark.parametrize("args", [["restart", "nosuch"], ["down", "--tier", "nosuch"],
                                  ["up", "--tier", "nosuch"], ["logs", "nosuch"],
                                  ["restart", "standrad"]])
def test_a_typo_names_the_services_and_the_stack_keeps_serving(stack, args):
    before, sup = ready_pids(stack), supervisor_pid(stack)
    res = stack.cli(*args, timeout=60)
    assert res.returncode != 0
    assert f"no service named {args[-1]!r}" in res.stderr
    assert "standard" in res.stderr and "embeddings" in res.stderr
    assert "proxy" in res.stderr or args[0] == "up"  # `up --tier` takes model servers only
    if args[-1] == "standrad":
        assert "did you mean 'standard'" in res.stderr
    no_traceback(res)
    time.sleep(1.0)
    assert ready_pids(stack) == before and supervisor_pid(stack) == sup


def test_garbage_in_the_command_folder_is_answered_removed_and_harmless(stack):
    before, sup = ready_pids(stack), supervisor_pid(stack)
    folder = stack.home / "run" / "commands"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "junk.json").write_bytes(b"\x00not json at all")
    (folder / "list.json").write_text('["restart", "standard"]')
    (folder / "boom.json").write_text('{"action": "explode", "target": "standard"}')
    (folder / "ghost.json").write_text('{"action": "restart", "target": "nosuch"}')
    (folder / "adir.json").mkdir()
    deadline = time.monotonic() + 10
    names = ("junk", "list", "boom", "ghost", "adir")
    while time.monotonic() < deadline and not all(
            (folder / f"{n}.answer").exists() for n in names):
        time.sleep(0.1)
    answers = {n: json.loads((folder / f"{n}.answer").read_text()) for n in names}
    assert {n: a["error"]["code"] for n, a in answers.items()} == {
        "junk": "malformed", "list": "malformed", "boom": "unknown_action",
        "ghost": "unknown_service", "adir": "malformed"}
    assert "no service named 'nosuch'" in answers["ghost"]["error"]["message"]
    assert not any((folder / f"{n}.json").exists() for n in names)
    log = stack.cli("logs", "supervisor", "-n", "100").stdout
    assert "refused a command" in log and "not JSON" in log
    assert ready_pids(stack) == before and supervisor_pid(stack) == sup
    # The CLI still drives the same supervisor.
    assert stack.cli("down", "--tier", "nosuch").returncode != 0


def test_an_alias_bomb_over_the_stack_file_is_refused_and_nothing_freezes(stack):
    path = stack.home / "stack.yaml"
    good = path.read_text()
    before, sup = ready_pids(stack), supervisor_pid(stack)
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"{x}: &{x} [{','.join(['*' + y] * 9)}]"
             for x, y in zip("bcdefghi", "abcdefgh", strict=True)]
    try:
        path.write_text("\n".join(bomb) + "\n")
        t0 = time.monotonic()
        res = stack.cli("status", "--json", timeout=30)
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert took < 10, took  # the CLI's own parse is refused too (107 s before)
        deadline = time.monotonic() + 20
        problem = ""
        while time.monotonic() < deadline and "nested aliases" not in problem:
            problem = stack.status()["problem"] or ""
            time.sleep(0.3)
        assert "expands to more than 100,000 values (nested aliases?)" in problem
        assert ready_pids(stack) == before and supervisor_pid(stack) == sup
    finally:
        path.write_text(good)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and stack.status()["problem"]:
        time.sleep(0.3)
    assert stack.status()["problem"] is None
    assert ready_pids(stack) == before


def test_a_snapshot_that_cannot_be_written_is_a_warning_not_an_exit(stack):
    """state.json replaced by a folder: every write of it fails (EISDIR), for real."""
    before, sup = ready_pids(stack), supervisor_pid(stack)
    state = stack.home / "run" / "state.json"
    saved = state.read_text()
    state.unlink()
    state.mkdir()
    (state / "blocker").write_text("x")
    try:
        deadline = time.monotonic() + 15
        log = ""
        while time.monotonic() < deadline and "cannot write" not in log:
            log = stack.cli("logs", "supervisor", "-n", "50").stdout
            time.sleep(0.3)
        assert f"warning: cannot write {state}: Is a directory" in log
        res = stack.cli("status", "--json")  # still answers, and says what is wrong
        no_traceback(res)
        assert res.returncode == 0, res.stderr
        body = json.loads(res.stdout)
        assert any("unreadable" in w for w in body["warnings"]), body
        time.sleep(3)  # a few more failed writes
        alive = [psutil.pid_exists(p) for p in [sup, *before.values()]]
        assert all(alive), alive
    finally:
        (state / "blocker").unlink()
        state.rmdir()
    del saved
    after = ready_pids(stack)
    assert after == before and supervisor_pid(stack) == sup
    warnings = stack.status()["warnings"]
    assert any("Is a directory" in w for w in warnings), warnings
    assert "is written again" in stack.cli("logs", "supervisor", "-n", "50").stdout


def test_two_ups_at_once_start_one_supervisor_and_signal_nothing(tmp_path):
    """Leftover cleanup happens only under the lock: the second `up` never ends the first's
    fresh children."""
    import subprocess

    from stackenv import MLX_STACK

    env = write_stack(tmp_path / "twice", None)
    procs = [subprocess.Popen([*MLX_STACK, "up"], env=env.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        pids = ready_pids(env)
        sups = [line for line in (env.home / "logs" / "supervisor.log").read_text().splitlines()
                if "another supervisor already runs" in line]
        assert len(sups) <= 1  # the loser said so and exited; nothing else happened
        first_log = (env.home / "logs" / "embeddings.log").read_text()
        assert first_log.count("starting embeddings") == 1  # never signalled and restarted
        assert ready_pids(env) == pids
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        env.cli("down", timeout=120)
        env.kill_everything()
