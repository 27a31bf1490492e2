"""The state folder against other local users, with the real CLI, supervisor and child processes.

- A state folder another user owns or can write is refused by `status`, `up` and the supervisor,
  with the fix, and nothing starts; one merely readable by others (older versions) is made
  private.
- No process of ours imports a module planted in its working folder (``run/``).
- `mlx-stack logs` shows a child's control characters instead of sending them to the terminal,
  and reads no log through a link.

The tests run as root: ownership and modes are set with ``os.chown``/``chmod`` and the refusals
checked, never an EACCES.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs_root
from stackenv import write_stack

from mlx_stack.errors import ServiceStartError
from mlx_stack.paths import StatePaths
from mlx_stack.private import make_dirs
from mlx_stack.supervisor import processes
from mlx_stack.supervisor.logsink import RotatingLog

STRANGER = 54321  # a uid and gid no account has
REPO = Path(__file__).resolve().parents[2]


def no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- refused, with the fix -------------------------------------------------------------------

@needs_root
def test_a_state_folder_of_another_user_is_refused_by_status_and_up(tmp_path):
    env = write_stack(tmp_path / "home", None)
    os.chown(env.home, STRANGER, -1)
    for command in ("status", "up"):
        res = env.cli(command, timeout=120)
        assert res.returncode == 5, (command, res.stderr)
        assert f"the state folder {env.home} is not yours alone" in res.stderr
        assert f"{env.home} belongs to uid {STRANGER}, not to you (root)" in res.stderr
        assert f"`sudo chown -R root {env.home}`" in res.stderr
        no_traceback(res)
    assert not (env.home / "run").exists()  # `up` started nothing, wrote nothing
    assert not (env.home / "logs").exists()


def test_a_state_folder_others_can_write_is_refused(tmp_path):
    env = write_stack(tmp_path / "home", None)
    (env.home / "logs").mkdir()
    (env.home / "logs").chmod(0o777)
    res = env.cli("status")
    assert res.returncode == 5
    assert f"{env.home / 'logs'} is writable by every user (mode 0777)" in res.stderr
    assert f"`chmod -R go-rwx {env.home}`" in res.stderr
    no_traceback(res)
    assert mode(env.home / "logs") == 0o777  # refused, not silently repaired


@needs_root
def test_the_supervisor_refuses_a_foreign_state_folder_itself(tmp_path):
    """launchd and systemd start the supervisor without the CLI's check."""
    env = write_stack(tmp_path / "home", None)
    os.chown(env.home, STRANGER, -1)
    res = subprocess.run([*processes.python_module("mlx_stack.supervisor")], env=env.env,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 5
    assert "mlx-stack supervisor: the state folder" in res.stderr
    assert "sudo chown -R root" in res.stderr
    no_traceback(res)


def test_a_readable_old_state_folder_is_made_private_and_said(tmp_path):
    env = write_stack(tmp_path / "home", None)  # 0755 / 0644, as older versions made them
    (env.home / "logs").mkdir(mode=0o755)
    (env.home / "logs" / "standard.log").write_text("old\n")
    (env.home / "logs" / "standard.log.1").write_text("older\n")
    assert mode(env.home) & 0o077
    res = env.cli("status")
    assert res.returncode == 0, res.stderr
    assert "note: made " in res.stderr and f"in {env.home} private" in res.stderr
    for path in [env.home, *env.home.rglob("*")]:
        assert mode(path) & 0o077 == 0, path
    assert "note:" not in env.cli("status").stderr  # said once


# --- nothing is imported from the working folder ---------------------------------------------

PLANT = """\
import sys
with open({marker!r}, "a") as f:
    f.write("{name} imported by " + " ".join(sys.argv) + "\\n")
raise SystemExit(97)
"""


def plant(folder: Path, marker: Path, *names: str) -> None:
    """Modules a local attacker (or an accident) left where a process starts."""
    for name in names:
        (folder / f"{name}.py").write_text(PLANT.format(marker=str(marker), name=name))


CODE = "import json; print('real json', json.dumps([1]), flush=True)"


def run_in(cwd: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_the_plant_works_on_a_plain_python_m(tmp_path):
    """The control: how children were started before, the planted module runs."""
    marker = tmp_path / "imported"
    plant(tmp_path, marker, "json", "threading")
    res = run_in(tmp_path, [sys.executable, "-m", "mlx_stack.supervisor.childguard", "-c", CODE])
    assert res.returncode == 97 and marker.exists()


@pytest.mark.parametrize("safe_flag", [True, False], ids=["-P", "3.10 bootstrap"])
def test_the_child_guard_does_not_import_from_its_working_folder(tmp_path, safe_flag):
    marker = tmp_path / "imported"
    plant(tmp_path, marker, "json", "threading", "contextlib", "runpy")
    argv = [*processes.python_module("mlx_stack.supervisor.childguard", safe_flag), "-c", CODE]
    res = run_in(tmp_path, argv)
    assert res.returncode == 0, res.stderr
    assert "real json [1]" in res.stdout and not marker.exists()


def test_a_service_started_by_the_supervisor_does_not_import_from_run(tmp_path):
    """start_child as the supervisor calls it (lifeline: through the child guard), cwd run/."""
    run = make_dirs(tmp_path / "run")
    marker = tmp_path / "imported"
    plant(run, marker, "json", "threading")
    log = RotatingLog(tmp_path / "svc.log", 1_000_000, 1)
    r, w = os.pipe()
    try:
        # the grandchild is a plain `python -c`: PYTHONSAFEPATH keeps '' off its path too
        grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {CODE!r}])"
        child = processes.start_child([sys.executable, "-c", CODE + "\n" + grandchild],
                                      os.environ, run, log, lifeline=r)
        child.popen.wait(timeout=60)
        child.finish()
    finally:
        os.close(r)
        os.close(w)
        log.close()
    text = (tmp_path / "svc.log").read_text()
    assert child.popen.returncode == 0, text
    assert text.count("real json [1]") == 2 and not marker.exists()


def test_the_supervisor_started_by_up_does_not_import_from_run(tmp_path, monkeypatch):
    from mlx_stack.cli import lifecycle
    from mlx_stack.contract.snapshot import load_snapshot

    paths = StatePaths(tmp_path / "home")
    make_dirs(paths.run)
    (paths.home / "stack.yaml").write_text("version: 1\n")  # it starts, then exits: no service
    marker = tmp_path / "imported"
    plant(paths.run, marker, "json", "threading", "signal", "argparse")
    monkeypatch.setenv("MLX_STACK_HOME", str(paths.home))
    try:
        lifecycle._spawn_supervisor(paths, None, lambda *_: None)
    except ServiceStartError as exc:  # it may exit before `up` sees its snapshot
        assert "nothing to run" in str(exc)
    finally:
        lifecycle.down(paths, timeout_s=10)
    snap = load_snapshot(paths.state_file)
    assert snap is not None and "nothing to run" in (snap.stack_error or "")  # it really ran
    assert not marker.exists()


# --- logs ------------------------------------------------------------------------------------

HOSTILE = "\x1b[2J\x1b]0;owned\x07cleared the screen\rand moved the cursor \x9b31m\tend"


def test_logs_shows_control_characters_instead_of_obeying_them(tmp_path):
    env = write_stack(tmp_path / "home", None)
    logs = make_dirs(env.home / "logs")
    (logs / "evil.log").write_text(f"fine line\n{HOSTILE}\n")
    (logs / "evil.log.1").write_text(f"old {HOSTILE}\n")
    for args in (("logs", "evil"), ("logs", "evil", "--all")):
        res = env.cli(*args)
        assert res.returncode == 0, res.stderr
        assert "\x1b" not in res.stdout and "\r" not in res.stdout and "\x9b" not in res.stdout
        shown = "^[[2J^[]0;owned^Gcleared the screen^Mand moved the cursor \\x9b31m\tend"
        assert shown in res.stdout
    assert "old ^[[2J" in env.cli("logs", "evil", "--all").stdout


def test_logs_refuses_a_link_in_place_of_a_log(tmp_path):
    env = write_stack(tmp_path / "home", None)
    logs = make_dirs(env.home / "logs")
    secret = tmp_path / "secret.txt"
    secret.write_text("someone else's file\n")
    (logs / "standard.log").write_text("x\n")
    (logs / "evil.log").symlink_to(secret)
    res = env.cli("logs", "evil")
    assert res.returncode == 1
    assert f"{logs / 'evil.log'} is not a regular file (a link?)" in res.stderr
    assert "someone else's" not in res.stdout + res.stderr
    no_traceback(res)
