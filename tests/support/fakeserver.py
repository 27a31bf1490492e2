"""A small real HTTP server that behaves like a model server, for watchdog tests.

It answers the probes the supervisor sends (a chat completion, an embedding, a rerank, the
proxy's readiness route) and can misbehave on request: exit early, ignore SIGTERM, flood its output,
load slowly. The watchdog is tested against real processes of this program on free ports.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Never released once taken: a handler that needs it waits forever (a deadlock: no CPU).
DEADLOCK = threading.Lock()
#: Cleared while the server is "busy": handlers wait for the work to finish (GIL-starved or
#: single-worker servers look like this), while a worker thread burns CPU and logs progress.
NOT_BUSY = threading.Event()
NOT_BUSY.set()


class Handler(BaseHTTPRequestHandler):
    def _send(self, body: dict, status: int = 200) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _wait_if_stuck(self) -> None:
        NOT_BUSY.wait()
        if DEADLOCK.locked():
            DEADLOCK.acquire()  # forever

    def do_GET(self) -> None:
        self._wait_if_stuck()
        self._send({"status": "healthy"})

    def do_POST(self) -> None:
        self._wait_if_stuck()
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if RECORD is not None:
            with open(RECORD, "a", encoding="utf-8") as f:
                f.write(json.dumps({"path": self.path, "headers": dict(self.headers),
                                    "body": raw.decode("utf-8", "replace")}) + "\n")
        if self.path.endswith("/rerank"):
            body = json.loads(raw or b"{}")
            if body.get("query") == BAD_QUERY:
                self._send({"error": {"message": "query: refused by the fake", "code": None,
                                      "type": "invalid_request_error", "param": "query"}}, 400)
            else:
                self._send(rerank_answer(body))
        elif self.path.endswith("/embeddings"):
            self._send({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                    "embedding": [1.0, 0.0]}]})
        else:
            self._send({"choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": "x"}}]})

    def log_message(self, *args: object) -> None:
        pass


#: A rerank query the fake refuses with a 400 in OpenAI's error shape (error passthrough tests).
BAD_QUERY = "refuse me"
#: A file each POST is appended to as one JSON line (path, headers, body), when given.
RECORD: str | None = None


def rerank_answer(body: dict) -> dict:
    """A Cohere-shaped rerank answer: the score is the share of query words in the document."""
    query = set(str(body.get("query", "")).lower().split())
    docs = [d["text"] if isinstance(d, dict) else str(d) for d in body.get("documents", [])]
    scored = [(len(query & set(d.lower().split())) / max(len(query), 1), i)
              for i, d in enumerate(docs)]
    scored.sort(key=lambda s: (-s[0], s[1]))
    top_n = body.get("top_n") or len(scored)
    results = []
    for score, i in scored[:top_n]:
        r: dict = {"index": i, "relevance_score": score}
        if body.get("return_documents"):
            r["document"] = {"text": docs[i]}
        results.append(r)
    return {"id": "fake-rerank", "results": results,
            "meta": {"billed_units": {"search_units": 1}, "tokens": {"input_tokens": 1}},
            "usage": {"total_tokens": 1}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--exit-after", type=float, help="exit this many seconds after start")
    p.add_argument("--exit-code", type=int, default=1)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--flood", type=int, default=0, help="print this many lines first")
    p.add_argument("--load-s", type=float, default=0.0, help="seconds of 'loading' first")
    p.add_argument("--silent", action="store_true", help="load without printing anything")
    p.add_argument("--tag", default="", help="ignored; changes the command line")
    p.add_argument("--deadlock-after", type=float, help="stop answering (no CPU) after S s")
    p.add_argument("--busy-after", type=float, help="answer nothing while busy, from S s")
    p.add_argument("--busy-for", type=float, default=10.0, help="how long the busy spell lasts")
    p.add_argument("--record", help="append every POST (path, headers, body) to this file")
    a = p.parse_args()
    global RECORD
    RECORD = a.record
    if a.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"fakeserver on {a.port} pid-start", flush=True)
    for i in range(a.flood):
        sys.stdout.write(f"flood line {i:07d} " + "x" * 80 + "\n")
    sys.stdout.flush()
    deadline = time.monotonic() + a.load_s
    while time.monotonic() < deadline:
        if not a.silent:
            print("loading...", flush=True)
        time.sleep(0.2)
    if a.exit_after is not None:
        time.sleep(a.exit_after)
        print(f"exiting with {a.exit_code}", flush=True)
        sys.exit(a.exit_code)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print("serving", flush=True)
    if a.deadlock_after is not None:
        threading.Timer(a.deadlock_after, DEADLOCK.acquire).start()
    if a.busy_after is not None:
        threading.Timer(a.busy_after, _busy, args=(a.busy_for,)).start()
    server.serve_forever()


def _busy(seconds: float) -> None:
    """Burn CPU for ``seconds`` and log progress, answering nothing meanwhile."""
    NOT_BUSY.clear()
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        x = 0
        for i in range(200_000):
            x += i * i
        step += 1
        if step % 20 == 0:
            print(f"busy: step {step}", flush=True)
    print("busy spell over", flush=True)
    NOT_BUSY.set()


if __name__ == "__main__":
    main()
