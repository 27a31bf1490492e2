"""`mlx-stack install` / `uninstall`: run the supervisor at login, restarted if it dies.

macOS gets a launchd agent (~/Library/LaunchAgents), Linux a systemd user unit
(~/.config/systemd/user). Both run `mlx-stack up --foreground`; the service manager restarts
the supervisor, the supervisor restarts the services. The commands that load the files
(launchctl, systemctl) go through a runner that tests replace, since neither works here.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from mlx_stack.atomic import write_atomic
from mlx_stack.errors import MlxStackError
from mlx_stack.paths import StatePaths

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


@dataclass(frozen=True)
class Unit:
    """A service-manager file for this stack: where it goes, what it says, how to load it."""

    system: str  # "launchd" or "systemd"
    label: str
    path: Path
    text: str
    load: tuple[tuple[str, ...], ...]
    unload: tuple[tuple[str, ...], ...]


def _label(paths: StatePaths) -> str:
    default = Path.home() / ".mlx-stack"
    if paths.home.resolve() == default.resolve():
        return "mlx-stack"
    return "mlx-stack-" + hashlib.sha256(str(paths.home.resolve()).encode()).hexdigest()[:8]


def _argv() -> list[str]:
    return [sys.executable, "-m", "mlx_stack.cli", "up", "--foreground"]


def _launchd(paths: StatePaths, home: Path) -> Unit:
    label = "com.mlx-stack." + _label(paths)
    args = "".join(f"\n    <string>{escape(a)}</string>" for a in _argv())
    log = escape(str(paths.log_file("supervisor")))
    text = f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{escape(label)}</string>
  <key>ProgramArguments</key>
  <array>{args}
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>MLX_STACK_HOME</key>
    <string>{escape(str(paths.home))}</string>
  </dict>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <true/>
  <key>ThrottleInterval</key>
  <integer>10</integer>
  <key>ExitTimeOut</key>
  <integer>60</integer>
  <key>StandardOutPath</key>
  <string>{log}</string>
  <key>StandardErrorPath</key>
  <string>{log}</string>
</dict>
</plist>
"""
    path = home / "Library" / "LaunchAgents" / f"{label}.plist"
    domain = f"gui/{os.getuid()}"
    return Unit("launchd", label, path, text,
                load=(("launchctl", "bootstrap", domain, str(path)),),
                unload=(("launchctl", "bootout", f"{domain}/{label}"),))


def _systemd(paths: StatePaths, home: Path) -> Unit:
    label = _label(paths)
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    exec_start = " ".join(shlex.quote(a) for a in _argv())
    text = f"""[Unit]
Description=mlx-stack: local LLM stack (chat tiers, embeddings, LiteLLM proxy)
After=network.target

[Service]
Type=simple
Environment=MLX_STACK_HOME={paths.home}
ExecStart={exec_start}
# The supervisor stops its services (proxy first) on SIGTERM; anything left is killed after.
KillMode=mixed
TimeoutStopSec=60
Restart=always
RestartSec=5

[Install]
WantedBy=default.target
"""
    path = config / "systemd" / "user" / f"{label}.service"
    return Unit("systemd", label, path, text,
                load=(("systemctl", "--user", "daemon-reload"),
                      ("systemctl", "--user", "enable", "--now", f"{label}.service")),
                unload=(("systemctl", "--user", "disable", "--now", f"{label}.service"),))


def unit_for(paths: StatePaths, system: str | None = None, home: Path | None = None) -> Unit:
    system = system or platform.system()
    home = home or Path.home()
    if system == "Darwin":
        return _launchd(paths, home)
    if system == "Linux":
        return _systemd(paths, home)
    raise MlxStackError(f"no service manager support for {system}; run `mlx-stack up` instead")


def _run_all(commands: Sequence[Sequence[str]], runner: Runner) -> None:
    for argv in commands:
        try:
            res = runner(argv)
        except FileNotFoundError:
            raise MlxStackError(f"{argv[0]} is not available on this machine; the unit file is "
                                f"written, load it by hand with: {shlex.join(argv)}") from None
        if res.returncode != 0:
            lines = (res.stderr or res.stdout).strip().splitlines()
            why = lines[-1] if lines else f"exit code {res.returncode}"
            raise MlxStackError(f"`{shlex.join(argv)}` failed: {why}")


def install(unit: Unit, runner: Runner = run_command) -> None:
    write_atomic(unit.path, unit.text, mode=0o644)  # no secret; the usual mode for units
    _run_all(unit.load, runner)


def uninstall(unit: Unit, runner: Runner = run_command) -> bool:
    """Unload and remove the unit; False if it was not installed."""
    if not unit.path.exists():
        return False
    _run_all(unit.unload, runner)
    unit.path.unlink()
    return True
