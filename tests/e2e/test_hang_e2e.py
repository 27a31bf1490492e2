"""A hung tier costs clients seconds, not minutes: real servers, the real proxy, real load, the
watchdog's DEFAULT settings (what users run).

A tier is stopped with SIGSTOP (alive, port open, never answers) while a client sends it a
request every 0.1 s through the proxy. The supervisor must see it within seconds, the proxy's
gate must send new requests elsewhere (the other chat tier) or hold them a few seconds and
then refuse them with a 503 (the embeddings tier, which has no replica), and the tier must be
replaced within 20 s (the restart time depends on the machine's load: the summary says it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest
from stackenv import StackEnv, write_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model) -> Iterator[StackEnv]:
    env = write_stack(tmp_path_factory.mktemp("hang"), tiny_model)  # default watchdog settings
    try:
        env.cli("up", check=True, timeout=600)
        yield env
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()


@dataclass
class Call:
    start: float
    seconds: float
    status: int | str
    retry_after: str | None = None


def load(env: StackEnv, send: Callable[[httpx.Client], httpx.Response], stop: threading.Event,
         out: list[Call]) -> None:
    with httpx.Client(base_url=env.url("proxy"), timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {env.key()}"}) as client:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = send(client)
                out.append(Call(t0, time.monotonic() - t0, r.status_code,
                                r.headers.get("retry-after")))
            except httpx.HTTPError as exc:
                out.append(Call(t0, time.monotonic() - t0, type(exc).__name__))
            time.sleep(0.1)


def services(env: StackEnv) -> dict[str, dict]:
    return {s["name"]: s for s in env.status()["services"]}


def stop_under_load(env: StackEnv, name: str, send: Callable[[httpx.Client], httpx.Response]
                    ) -> tuple[list[Call], float, float]:
    """SIGSTOP ``name`` under load; return the calls, when it was stopped, and how long until
    a new process of it was ready."""
    before = services(env)
    assert all(s["state"] == "ready" for s in before.values()), before
    pid = before[name]["pid"]
    calls: list[Call] = []
    stop = threading.Event()
    client = threading.Thread(target=load, args=(env, send, stop, calls), daemon=True)
    client.start()
    try:
        time.sleep(3)
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        replaced = None
        while time.monotonic() - stopped_at < 60:
            s = services(env)[name]
            if s["state"] == "ready" and s["pid"] not in (None, pid):
                replaced = time.monotonic() - stopped_at
                break
            time.sleep(0.2)
        time.sleep(3)  # traffic after the return
    finally:
        stop.set()
        client.join(timeout=90)
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    assert replaced is not None, f"{name} not replaced within 60 s: {services(env)[name]}"
    return calls, stopped_at, replaced


def test_a_stopped_chat_tier_under_load_costs_clients_nothing(stack):
    def chat(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/chat/completions", json={
            "model": "standard", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]})

    calls, stopped_at, replaced = stop_under_load(stack, "standard", chat)
    during = [c for c in calls if c.start >= stopped_at - 1]
    failed = [c for c in calls if c.status != 200]
    worst = max(c.seconds for c in during)
    summary = (f"replaced after {replaced:.1f} s, {len(failed)} failed of {len(calls)}, "
               f"worst {worst:.1f} s, load {os.getloadavg()[0]:.1f}")
    assert not failed, (summary, failed)
    assert worst < 10, f"a request waited while 'fast' could serve it: {summary}"
    assert len(during) > 20, summary
    assert replaced < 20, summary


def test_a_stopped_embeddings_tier_gets_fast_503s_not_stalls(stack):
    def embed(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/embeddings", json={"model": "local-embed", "input": "hello"})

    calls, stopped_at, replaced = stop_under_load(stack, "embeddings", embed)
    # Every call still open at the stop: the client is sequential, so a request in flight at
    # that moment is the one that waits out the outage (no later one starts meanwhile).
    during = [c for c in calls if c.start + c.seconds >= stopped_at]
    worst = max(c.seconds for c in during)
    summary = (f"replaced after {replaced:.1f} s, worst {worst:.1f} s, "
               f"load {os.getloadavg()[0]:.1f}")
    assert worst < 10, f"a request stalled: {summary}"
    assert replaced < 20, summary
    refused = [c for c in during if c.status != 200]
    assert all(c.status == 503 and c.retry_after for c in refused), refused
    held = [c for c in during if c.seconds > 0.5]
    assert held or refused, "no request saw the outage: the test did not test"
    back = [c for c in calls if c.start >= stopped_at + replaced + 1]
    assert back and all(c.status == 200 for c in back), back
