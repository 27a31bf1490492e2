"""`mlx-stack logs embeddings -f` with replicas: new lines of every replica's log, each with
its replica's name (``logfiles.follow_many``), on real files and threads."""

from __future__ import annotations

import threading
import time

from mlx_stack.logfiles import follow_many


def test_following_a_tier_interleaves_each_replicas_new_lines(tmp_path):
    logs = {n: tmp_path / f"{n}.log" for n in ("embeddings", "embeddings-2")}
    for path in logs.values():
        path.write_text("old line\n")
    got: list[tuple[str, str]] = []
    lines = follow_many(logs, poll_s=0.02)

    def reader() -> None:
        for item in lines:
            got.append(item)
            if len(got) == 2:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(0.3)  # the followers start at the end of each file
    with logs["embeddings-2"].open("a") as f:
        f.write("second replica\n")
    with logs["embeddings"].open("a") as f:
        f.write("first replica\n")
    t.join(timeout=5)
    assert sorted(got) == [("embeddings", "first replica"), ("embeddings-2", "second replica")]
