"""`install` / `uninstall`: the unit files are real; launchctl and systemctl cannot run here,
so the runner that would call them is replaced by a recorder (the one mock, and why)."""

from __future__ import annotations

import plistlib
import subprocess
import sys

import pytest
from stackenv import StackEnv

from mlx_stack.cli import autostart
from mlx_stack.errors import MlxStackError
from mlx_stack.paths import StatePaths


class Recorder:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv):
        self.calls.append(list(argv))
        code = 1 if self.fail and self.fail in argv else 0
        return subprocess.CompletedProcess(argv, code, "", "boom" if code else "")


def test_launchd_plist_is_valid_and_runs_the_foreground_supervisor(tmp_path):
    paths = StatePaths(tmp_path / "state")
    unit = autostart.unit_for(paths, "Darwin", tmp_path / "home")
    plist = plistlib.loads(unit.text.encode())
    assert plist["ProgramArguments"][-2:] == ["up", "--foreground"]
    assert plist["ProgramArguments"][0] == sys.executable
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["EnvironmentVariables"]["MLX_STACK_HOME"] == str(paths.home)
    assert unit.path.parent == tmp_path / "home" / "Library" / "LaunchAgents"
    rec = Recorder()
    autostart.install(unit, rec)
    assert unit.path.read_text() == unit.text
    assert rec.calls[0][:2] == ["launchctl", "bootstrap"]
    assert autostart.uninstall(unit, rec) and not unit.path.exists()
    assert rec.calls[-1][:2] == ["launchctl", "bootout"]


def test_systemd_unit_restarts_the_supervisor(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    unit = autostart.unit_for(StatePaths(tmp_path / "state"), "Linux", tmp_path / "home")
    assert unit.path.parent == tmp_path / "cfg" / "systemd" / "user"
    assert "Restart=always" in unit.text and "KillMode=mixed" in unit.text
    assert "up --foreground" in unit.text
    rec = Recorder(fail="enable")
    with pytest.raises(MlxStackError, match="failed: boom"):
        autostart.install(unit, rec)
    assert unit.path.exists()  # the file is written; loading it is what failed
    assert not autostart.uninstall(autostart.unit_for(StatePaths(tmp_path / "x"), "Linux",
                                                      tmp_path / "nowhere"), rec)


def test_install_print_shows_the_file(tmp_path):
    env = StackEnv(tmp_path / "state", {})
    res = env.cli("install", "--print", check=True)
    assert "[Service]" in res.stdout or "<plist" in res.stdout
    assert str(env.home) in res.stdout
