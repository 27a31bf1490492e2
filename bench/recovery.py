"""How the stack rides out a crash: kill -9 the embeddings server under load through the proxy.

    python bench/recovery.py [--retries 0,1,3] [--clients 4] [--seconds 20]

For each proxy retry setting, in one run on this machine: bring up an embeddings + proxy
stack in a temporary state folder (free ports, the bundled MiniLM), drive it with N client
threads sending one-text embedding requests through the proxy, kill -9 the embeddings server,
and report the failed requests and the time until the server is ready again (split into
"kill to new process" and "new process to ready", the model load). Prints a Markdown table.
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
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))

from stackenv import write_stack  # noqa: E402


def snapshot(home: Path) -> dict:
    return json.loads((home / "run" / "state.json").read_text())


def embeddings_state(home: Path) -> tuple[str, int | None, float | None]:
    s = snapshot(home)["services"]["embeddings"]
    proc = s.get("process") or {}
    return s["state"], proc.get("pid"), s.get("started_at")


def run_scenario(retries: int, clients: int, seconds: float) -> dict:
    home = Path(tempfile.mkdtemp(prefix="mlx-stack-recovery-"))
    env = write_stack(home, None)
    stack = home / "stack.yaml"
    text = stack.read_text()
    stack.write_text(text.replace("timeout_s: 60", f"timeout_s: 60\n  num_retries: {retries}"))
    env.cli("up", check=True, timeout=600)
    url = env.url("proxy") + "/v1/embeddings"
    headers = {"Authorization": f"Bearer {env.key()}"}
    results: list[tuple[float, float, bool]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=60, trust_env=False) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = c.post(url, json={"model": "local-embed", "input": "a steady load"},
                                headers=headers).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    results.append((t0, time.monotonic(), ok))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(5)
        _, pid, _ = embeddings_state(home)
        killed_at_wall, killed_at = time.time(), time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid = started_wall = None
        while time.monotonic() - killed_at < 300:
            state, p, started = embeddings_state(home)
            if p not in (None, pid) and new_pid is None:
                new_pid, started_wall = p, started
            if state == "ready" and p not in (None, pid):
                break
            time.sleep(0.02)
        ready_at = time.monotonic()
        time.sleep(max(0.0, seconds - (ready_at - killed_at)))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=70)
        env.cli("down", timeout=120)
        env.kill_everything()
    total = len(results)
    failed = sum(1 for _, _, ok in results if not ok)
    window = [r for r in results if killed_at - 1 <= r[0] <= ready_at + 1]
    latencies = [(e - s) * 1000 for s, e, ok in results if ok]
    return {
        "retries": retries, "requests": total, "failed": failed,
        "failed_in_window": sum(1 for _, _, ok in window if not ok),
        "kill_to_ready_s": ready_at - killed_at,
        "kill_to_new_process_s": (started_wall - killed_at_wall) if started_wall else None,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "max_ms": max(latencies) if latencies else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retries", default="0,1,3")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load avg {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print(f"workload: {a.clients} clients, one-text embeddings through the proxy, kill -9 of "
          f"the embeddings server after 5 s, {a.seconds:.0f} s from the kill\n")
    print("| proxy num_retries | requests | failed | kill → new process (s) | "
          "kill → ready (s) | new process → ready (s) | p50 ok (ms) | max ok (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (int(x) for x in a.retries.split(",")):
        res = run_scenario(r, a.clients, a.seconds)
        spawn = res["kill_to_new_process_s"]
        load_s = res["kill_to_ready_s"] - spawn if spawn is not None else float("nan")
        print(f"| {r} | {res['requests']} | {res['failed']} | {spawn:.2f} | "
              f"{res['kill_to_ready_s']:.2f} | {load_s:.2f} | {res['p50_ms']:.1f} | "
              f"{res['max_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
