"""How the stack rides out a crash or a hang of a tier, under load through the proxy.

    python bench/recovery.py [--faults kill,stop,restart,remote] [--targets embeddings,standard]
                             [--retries 1] [--clients 4] [--seconds 20] [--replicas 1,2]

For each fault (``kill``: kill -9; ``stop``: SIGSTOP, alive but never answering; ``restart``:
``mlx-stack restart TIER``, with replicas a rolling replacement; ``remote``: a second stack B,
its proxy on 127.0.0.2, serves A's ``local-embed`` as a remote, and B's embeddings server is
killed, then B's whole stack is stopped, while the clients talk to A), target tier, number of
embeddings replicas (``--replicas``; the fault hits the first replica) and proxy retry
setting, in one run on this machine: bring up a stack in a temporary state
folder (free ports; the bundled MiniLM for embeddings; for a chat target two chat tiers,
``standard`` and ``fast``, on a tiny random model built here), drive the target through the
proxy with N client threads, inject the fault, and report the requests that failed (and how
many of them were 503s with Retry-After), the worst client latency, and the time until the
tier is ready again (split into "fault to new process" and "new process to ready", the
model load). Prints a Markdown table, with the machine's CPU and load in its header.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))

from stackenv import write_stack  # noqa: E402


def snapshot(home: Path) -> dict:
    return json.loads((home / "run" / "state.json").read_text())


def tier_state(home: Path, name: str) -> tuple[str, int | None, float | None]:
    s = snapshot(home)["services"][name]
    proc = s.get("process") or {}
    return s["state"], proc.get("pid"), s.get("started_at")


def request_for(target: str) -> tuple[str, dict]:
    if target == "embeddings":
        return "/v1/embeddings", {"model": "local-embed", "input": "a steady load"}
    return "/v1/chat/completions", {"model": target, "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "hi"}]}


class Load:
    """N client threads POSTing one body through the proxy until stopped; each answer is
    recorded as (start, end, HTTP status or 0 for no answer)."""

    def __init__(self, url: str, body: dict, headers: dict[str, str], clients: int) -> None:
        self.results: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._args = (url, body, headers)
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(clients)]

    def _client(self) -> None:
        url, body, headers = self._args
        with httpx.Client(timeout=120, trust_env=False) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    status = c.post(url, json=body, headers=headers).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.results.append((t0, time.monotonic(), status))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=130)


def run_scenario(fault: str, target: str, retries: int, clients: int, seconds: float,
                 replicas: int = 1) -> dict:
    home = Path(tempfile.mkdtemp(prefix="mlx-stack-recovery-"))
    model = None
    if target != "embeddings":
        from tinymodel import build_tiny_chat_model

        model = build_tiny_chat_model(home / "models" / "tiny-chat")
    env = write_stack(home / "state", model, embeddings=target == "embeddings",
                      replicas=replicas if target == "embeddings" else 1)
    home = env.home
    stack = home / "stack.yaml"
    text = stack.read_text()
    stack.write_text(text.replace("timeout_s: 60", f"timeout_s: 60\n  num_retries: {retries}"))
    env.cli("up", check=True, timeout=600)
    path, body = request_for(target)
    url = env.url("proxy") + path
    headers = {"Authorization": f"Bearer {env.key()}"}
    load = Load(url, body, headers, clients)
    try:
        load.start()
        time.sleep(5)
        _, pid, _ = tier_state(home, target)
        assert pid is not None
        fault_wall, fault_at = time.time(), time.monotonic()
        started_wall = None
        if fault == "restart":  # returns once every replica runs a new, ready process
            env.cli("restart", target, check=True, timeout=600)
        else:
            os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        while time.monotonic() - fault_at < 300:
            state, p, started = tier_state(home, target)
            if p not in (None, pid) and started_wall is None:
                started_wall = started
            if state == "ready" and p not in (None, pid):
                break
            time.sleep(0.02)
        ready_at = time.monotonic()
        time.sleep(max(0.0, seconds - (ready_at - fault_at)))
    finally:
        load.stop()
        env.cli("down", timeout=120)
        env.kill_everything()
    results = load.results
    latencies = [(e - s) * 1000 for s, e, _ in results]
    return {
        "requests": len(results),
        "failed": sum(1 for *_, st in results if st != 200),
        "statuses": dict(Counter(st for *_, st in results if st != 200)),
        "fault_to_ready_s": ready_at - fault_at,
        "fault_to_new_process_s": (started_wall - fault_wall) if started_wall else None,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "max_ms": max(latencies) if latencies else None,
    }


def wait_until(pred, within: float) -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {within} s: {pred.__doc__}")
        time.sleep(0.2)


def run_remote_scenario(clients: int, seconds: float) -> dict:
    """A and B, each an embeddings-only stack with the bundled MiniLM; A lists B's
    ``local-embed`` under ``remotes:`` (the set-up of tests/e2e/test_remote_stacks.py).
    The clients call A; B's server dies (kill -9), then B's whole stack stops."""
    root = Path(tempfile.mkdtemp(prefix="mlx-stack-recovery-remote-"))
    b = write_stack(root / "b", None, embeddings=True)
    text = (b.home / "stack.yaml").read_text()
    (b.home / "stack.yaml").write_text(text.replace("proxy:\n", "proxy:\n  host: 127.0.0.2\n"))
    a = write_stack(root / "a", None, embeddings=True)
    (a.home / "remotes").mkdir()
    (a.home / "remotes" / "b.key").write_text(b.key() + "\n")
    (a.home / "remotes" / "b.key").chmod(0o600)
    with (a.home / "stack.yaml").open("a") as f:
        f.write(f"remotes:\n  b:\n    url: http://127.0.0.2:{b.ports['proxy']}\n"
                "    key_file: remotes/b.key\n    models: [local-embed]\n")
    load = Load(a.url("proxy") + "/v1/embeddings",
                {"model": "local-embed", "input": "a steady load"},
                {"Authorization": f"Bearer {a.key()}"}, clients)

    def accepted() -> bool:
        """B's local-embed accepted by A and A's proxy ready"""
        st = a.status()
        (remote,) = st["remotes"]
        proxy = next(s for s in st["services"] if s["name"] == "proxy")
        return remote["models"][0]["verdict"] == "accepted" and proxy["state"] == "ready"

    try:
        b.cli("up", check=True, timeout=600)
        a.cli("up", check=True, timeout=600)
        wait_until(accepted, 120)
        load.start()
        time.sleep(5)
        emb = next(s for s in b.status()["services"] if s["name"] == "embeddings")
        fault_at = time.monotonic()
        os.kill(emb["pid"], signal.SIGKILL)  # a process B's stack started
        time.sleep(seconds / 2)
        b.cli("down", check=True, timeout=120)
        time.sleep(seconds / 2)
    finally:
        load.stop()
        for env in (a, b):
            env.cli("down", timeout=120)
            env.kill_everything()
    results = load.results
    after = [(e - s) * 1000 for s, e, _ in results if s >= fault_at - 1]
    latencies = [(e - s) * 1000 for s, e, _ in results]
    return {
        "requests": len(results),
        "failed": sum(1 for *_, st in results if st != 200),
        "statuses": dict(Counter(st for *_, st in results if st != 200)),
        "fault_to_ready_s": None,
        "fault_to_new_process_s": None,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "max_ms": max(after) if after else None,
    }


def cpu_model() -> str:
    """The CPU's name and its widest vector extensions (the machines differ day to day)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))
    vec = [f for f in ("avx512f", "avx2", "neon") if f in flags]
    return f"{name} ({', '.join(vec) or 'no AVX2'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default="kill,stop")
    ap.add_argument("--targets", default="embeddings,standard")
    ap.add_argument("--retries", default="1")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--replicas", default="1", help="embeddings replicas, e.g. 1,2")
    a = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}, python "
          f"{platform.python_version()}, load avg {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print(f"workload: {a.clients} clients through the proxy (one-text embeddings, or 4-token "
          f"chat completions to `standard` with `fast` as its fallback), the fault after 5 s, "
          f"{a.seconds:.0f} s from the fault; the watchdog's default settings\n")
    print("| fault | tier | replicas | proxy num_retries | requests | failed (HTTP status: "
          "count; 0 = no answer) | fault → new process (s) | fault → ready (s) | p50 (ms) | "
          "worst (ms) | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for fault in a.faults.split(","):
        if fault == "remote":
            res = run_remote_scenario(a.clients, a.seconds)
            kinds = ", ".join(f"{s}: {c}" for s, c in sorted(res["statuses"].items()))
            print(f"| remote (B's server kill -9, then B down) | embeddings | 1 + B | - | "
                  f"{res['requests']} | {res['failed']}{f' ({kinds})' if kinds else ''} | - | - "
                  f"| {res['p50_ms']:.1f} | {res['max_ms']:.0f} | {os.getloadavg()[0]:.1f} |",
                  flush=True)
            continue
        for target in a.targets.split(","):
            for n in (int(x) for x in a.replicas.split(",")):
                if n > 1 and target != "embeddings":
                    continue  # replicas are an embeddings (and rerank) tier setting
                for r in (int(x) for x in a.retries.split(",")):
                    res = run_scenario(fault, target, r, a.clients, a.seconds, n)
                    spawn = res["fault_to_new_process_s"]
                    kinds = ", ".join(f"{s}: {c}" for s, c in sorted(res["statuses"].items()))
                    print(f"| {fault} | {target} | {n} | {r} | {res['requests']} | "
                          f"{res['failed']}{f' ({kinds})' if kinds else ''} | "
                          f"{spawn if spawn is None else f'{spawn:.2f}'} | "
                          f"{res['fault_to_ready_s']:.2f} | {res['p50_ms']:.1f} | "
                          f"{res['max_ms']:.0f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
