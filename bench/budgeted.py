"""Driving a workload within a time budget, so a saturated server yields a row, not a stall.

``run.py``'s drivers wait for every answer: right for MiniLM, but a real-size model on a slow
engine can take minutes per workload (Qwen3-0.6B fp32 on torch took over 25 minutes for one
model's row here). These drivers stop sending when the budget ends and cut off requests still
unanswered then; the outcome says how many of the planned requests were answered in time, and
percentiles count the unanswered ones as slower than any answered (so a p95 is only given when
95% were answered). A request cut off may still be computing in the server: ``abandoned`` says
so, and the caller restarts that server before its next workload.
"""

from __future__ import annotations

import http.client
import math
import queue
import threading
import time
from dataclasses import dataclass

import run


@dataclass(frozen=True)
class Outcome:
    """What a workload got from a server in its budget."""

    planned: int
    answered: int
    latencies_s: tuple[float, ...]
    """Sorted, answered requests only."""
    texts: int
    """Texts in the answered requests."""
    wall_s: float
    budget_s: float
    abandoned: bool
    refused: tuple[str, ...] = ()
    """Non-200 answers (status and the start of the body), which count as unanswered."""

    @property
    def saturated(self) -> bool:
        return self.answered < self.planned

    def percentile_ms(self, q: float) -> float:
        """Over every planned request, unanswered ones last; ``inf`` if it falls among them."""
        index = min(self.planned - 1, int(q * self.planned))
        return 1000 * self.latencies_s[index] if index < len(self.latencies_s) else math.inf

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.wall_s if self.wall_s > 0 else 0.0

    def verdict(self) -> str:
        """``""`` when all answered, else "saturated: N of M answered in B s" (and refusals)."""
        if not self.saturated:
            return ""
        refused = f", {len(self.refused)} refused ({self.refused[0][:40]})" if self.refused else ""
        return (f"saturated: {self.answered} of {self.planned} answered in "
                f"{self.budget_s:g} s{refused}")  # fmt: skip


def fmt_ms(value: float, budget_s: float) -> str:
    return f"> {budget_s:g} s" if math.isinf(value) else f"{value:.0f}"


class _Tally:
    """Shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.texts = 0
        self.refused: list[str] = []
        self.abandoned = False

    def answer(self, status: int, payload: bytes, latency: float, texts: int) -> None:
        with self.lock:
            if status == 200:
                self.latencies.append(latency)
                self.texts += texts
            else:
                self.refused.append(f"{status}: {payload[:80]!r}")


def _ask(server: run.Server, connection: http.client.HTTPConnection | None, body: bytes,
         deadline: float) -> tuple[http.client.HTTPConnection | None, int, bytes]:  # fmt: skip
    """One request that must be answered by ``deadline``; status 0: cut off (connection
    closed, returned ``None``)."""
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        return connection, 0, b""
    for attempt in (0, 1):
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=remaining)
        try:
            connection.timeout = remaining
            if connection.sock is not None:
                connection.sock.settimeout(remaining)
            connection.request("POST", "/v1/embeddings", body, headers=run.headers_of(server))
            response = connection.getresponse()
            return connection, response.status, response.read()
        except TimeoutError:
            connection.close()
            return None, 0, b""
        except (ConnectionError, http.client.HTTPException):
            connection.close()  # an idle keep-alive connection closed by the server: reconnect
            connection = None
            remaining = deadline - time.perf_counter()
            if attempt or remaining <= 0:
                return None, 0, b""
    return connection, 0, b""


def closed_loop(server: run.Server, workload: run.Workload, budget_s: float) -> Outcome:
    """``workload.clients`` clients, each sends its next request when answered, until done
    or the budget ends."""
    pending = [(server.body(x), 1 if isinstance(x, str) else len(x))
               for x in reversed(workload.inputs)]  # fmt: skip
    planned = len(pending)
    tally = _Tally()
    gate = threading.Barrier(workload.clients + 1)
    start = [0.0]

    def client() -> None:
        connection: http.client.HTTPConnection | None = None
        gate.wait()
        deadline = start[0] + budget_s
        while True:
            with tally.lock:
                if not pending or time.perf_counter() >= deadline:
                    break
                body, texts = pending.pop()
            sent = time.perf_counter()
            connection, status, payload = _ask(server, connection, body, deadline)
            if status == 0:
                tally.abandoned = True
                break
            tally.answer(status, payload, time.perf_counter() - sent, texts)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(workload.clients)]
    for thread in threads:
        thread.start()
    start[0] = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start[0]
    return Outcome(planned, len(tally.latencies), tuple(sorted(tally.latencies)), tally.texts,
                   wall, budget_s, tally.abandoned, tuple(tally.refused))  # fmt: skip


def open_loop(server: run.Server, workload: run.Workload, budget_s: float) -> Outcome:
    """One request every ``1/rate`` s on schedule whatever the answers do; latency from each
    one's scheduled time. Sending stops at the budget's end too; whatever is unanswered by
    then is cut off."""
    assert workload.rate is not None
    bodies = [server.body(x) for x in workload.inputs]
    jobs: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
    tally = _Tally()
    ready = threading.Barrier(workload.clients + 1)
    start = [0.0]

    def client() -> None:
        connection: http.client.HTTPConnection | None = None
        ready.wait()
        deadline = start[0] + budget_s
        while (job := jobs.get()) is not None:
            scheduled, body = job
            if time.perf_counter() >= deadline:
                continue  # never sent: unanswered
            connection, status, payload = _ask(server, connection, body, deadline)
            if status == 0:
                tally.abandoned = True
                continue
            tally.answer(status, payload, time.perf_counter() - scheduled, 1)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(workload.clients)]
    for thread in threads:
        thread.start()
    start[0] = time.perf_counter() + 0.05
    ready.wait()
    for k, body in enumerate(bodies):
        due = start[0] + k / workload.rate
        if due >= start[0] + budget_s:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        jobs.put((due, body))
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start[0]
    return Outcome(len(bodies), len(tally.latencies), tuple(sorted(tally.latencies)),
                   tally.texts, wall, budget_s, tally.abandoned, tuple(tally.refused))  # fmt: skip


def drive(server: run.Server, workload: run.Workload, budget_s: float) -> Outcome:
    if workload.rate is not None:
        return open_loop(server, workload, budget_s)
    return closed_loop(server, workload, budget_s)
