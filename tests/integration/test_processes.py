"""Process groups, identity and stopping, on real child processes (small Python programs)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace

import psutil
import pytest
from helpers import SLEEPER, STUBBORN, WITH_GRANDCHILD

from mlx_stack import logfiles as logs
from mlx_stack.supervisor import processes
from mlx_stack.supervisor.logsink import RotatingLog


def spawn(argv, log_path):
    """Start a child the way the supervisor does; return its identity record."""
    log = RotatingLog(log_path, 10_000_000, 2)
    log.mark("starting " + " ".join(argv))
    return processes.start_child(argv, os.environ, log_path.parent, log).record


@pytest.fixture
def started():
    """Records of everything a test spawns; their groups are killed at the end whatever happens."""
    recs: list[processes.ProcessRecord] = []
    yield recs
    processes.stop_all(recs, timeout_s=0.5)


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_spawn_runs_in_its_own_group_and_logs(tmp_path, started):
    log = tmp_path / "svc.log"
    rec = spawn([*SLEEPER[:2], "print('hello from child', flush=True)\n" + SLEEPER[2]], log)
    started.append(rec)
    assert os.getpgid(rec.pid) == rec.pid != os.getpgid(0)
    assert processes.is_running(rec)
    assert wait_for(lambda: re.search("^hello from child$", log.read_text(), re.M))
    assert "mlx-stack " in log.read_text()


def test_restart_appends_to_the_log(tmp_path, started):
    log = tmp_path / "svc.log"
    for word in ("first", "second"):
        rec = spawn([SLEEPER[0], "-c", f"print('{word}', flush=True)"], log)
        started.append(rec)
        assert wait_for(lambda rec=rec: not processes.is_running(rec))
    text = log.read_text()
    assert text.index("first") < text.index("second")
    assert len(re.findall("mlx-stack ", text)) == 2


def test_stop_ends_the_whole_group(tmp_path, started):
    log = tmp_path / "g.log"
    rec = spawn(WITH_GRANDCHILD, log)
    started.append(rec)
    assert wait_for(lambda: re.search(r"^grandchild \d+$", log.read_text(), re.M))
    grandchild = int(re.search(r"^grandchild (\d+)$", log.read_text(), re.M).group(1))
    assert psutil.pid_exists(grandchild)
    out = processes.stop_all([rec], timeout_s=5)
    assert out[rec.pid] == "terminated"
    assert wait_for(
        lambda: (
            not psutil.pid_exists(grandchild)
            or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        ),
        5,
    )


def test_a_child_ignoring_sigterm_is_killed_after_the_timeout(tmp_path, started):
    log = tmp_path / "s.log"
    rec = spawn(STUBBORN, log)
    started.append(rec)
    assert wait_for(lambda: re.search("^ignoring SIGTERM$", log.read_text(), re.M))
    t0 = time.monotonic()
    out = processes.stop_all([rec], timeout_s=1.0)
    assert out[rec.pid] == "killed after timeout"
    assert 0.9 <= time.monotonic() - t0 < 6
    assert not processes.is_running(rec)


def test_a_reused_pid_is_never_signalled(tmp_path, started):
    """A record whose start time differs from the live process is treated as gone."""
    rec = spawn(SLEEPER, tmp_path / "x.log")
    started.append(rec)
    impostor = replace(rec, create_time=rec.create_time - 1000)  # same pid, another process
    assert not processes.is_running(impostor)
    assert processes.stop_all([impostor], timeout_s=0.5) == {rec.pid: "not running"}
    assert processes.is_running(rec)  # the real process was left alone
    other_cmd = replace(rec, argv=("something", "else"))
    assert not processes.is_running(other_cmd)


def test_log_tail_reads_the_end(tmp_path):
    p = tmp_path / "big.log"
    p.write_text("".join(f"line {i}\n" for i in range(20000)))
    assert logs.tail(p, 3) == ["line 19997", "line 19998", "line 19999"]
    assert logs.tail(tmp_path / "none.log", 5) == []


def test_the_lifeline_ends_a_child_group_when_the_supervisor_side_closes(tmp_path, started):
    """The macOS stand-in for PR_SET_PDEATHSIG, shown here: closing the pipe's write end (what
    the supervisor's death does) makes the guard end the child's whole process group."""
    r, w = os.pipe()
    log = RotatingLog(tmp_path / "g.log", 10_000_000, 1)
    child = processes.start_child(WITH_GRANDCHILD, os.environ, tmp_path, log, lifeline=r)
    started.append(child.record)
    os.close(r)
    guard = tuple(processes.python_module("mlx_stack.supervisor.childguard"))
    assert child.record.argv[:len(guard)] == guard
    path = tmp_path / "g.log"
    assert wait_for(lambda: re.search(r"^grandchild \d+$", path.read_text(), re.M))
    grandchild = int(re.search(r"^grandchild (\d+)$", path.read_text(), re.M).group(1))
    assert processes.is_running(child.record)
    os.close(w)
    assert wait_for(lambda: child.poll() is not None, 10)
    assert wait_for(lambda: not psutil.pid_exists(grandchild)
                    or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE, 10)


def test_free_ports_are_distinct_and_outside_the_ephemeral_range():
    """A port in the ephemeral range can be taken by any outgoing connection's local end in
    the seconds before a server binds it (this broke a benchmark run): stay below it."""
    from mlx_stack import ports

    handed = [ports.free_port() for _ in range(50)]
    assert len(set(handed)) == 50
    low = ports._ephemeral_low()
    assert all(1024 <= p < low for p in handed), (low, handed)
    assert all(ports.is_free(p) for p in handed)
