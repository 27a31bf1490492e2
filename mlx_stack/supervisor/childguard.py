"""Run a Python service module so that it dies with its supervisor, on any OS.

Linux has PR_SET_PDEATHSIG; macOS has nothing like it. So every service (all of them are
Python programs: mlx_lm.server, our embeddings server, LiteLLM) starts through this module:
a thread blocks reading a pipe whose only writer is the supervisor; when the supervisor dies,
even by SIGKILL, the read returns end-of-file and the thread ends the service's whole process
group (SIGTERM, then SIGKILL after a grace period). Then the real module runs in-process
(``runpy``), so there is no extra process.

    python -m mlx_stack.supervisor.childguard --fd N [--grace S] (-m MODULE | -c CODE | SCRIPT)
        [ARGS...]
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import time


def _watch(fd: int, grace_s: float) -> None:
    try:
        while os.read(fd, 1024):
            pass  # the supervisor never writes; any bytes are ignored
    except OSError:
        pass
    pgrp = os.getpgrp()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgrp, signal.SIGTERM)
    time.sleep(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgrp, signal.SIGKILL)


def main(argv: list[str]) -> None:
    fd, grace, rest = -1, 5.0, list(argv)
    while rest and rest[0] in ("--fd", "--grace"):
        flag = rest.pop(0)
        if not rest:
            sys.exit(f"childguard: {flag} needs a value")
        if flag == "--fd":
            fd = int(rest.pop(0))
        else:
            grace = float(rest.pop(0))
    if not rest or (rest[0] == "-m" and len(rest) < 2):
        sys.exit("childguard: usage: --fd N [--grace S] (-m MODULE | SCRIPT) [ARGS...]")
    if fd >= 0:
        threading.Thread(target=_watch, args=(fd, grace), daemon=True,
                         name="childguard").start()
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    elif rest[0] == "-c" and len(rest) > 1:
        sys.argv = ["-c", *rest[2:]]
        exec(compile(rest[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(rest)
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
