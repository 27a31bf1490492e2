"""The supervisor process of one stack: take the lock, clean up leftovers, run the loop.

``python -m mlx_stack.supervisor [--only NAME ...]`` (started by `mlx-stack up`, or run attached
by `mlx-stack up --foreground` under launchd or systemd). Its stdout and stderr are the
supervisor log (``logs/supervisor.log``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from mlx_stack.backendkey import new_key, save_key
from mlx_stack.config.plan import load_plan
from mlx_stack.errors import MlxStackError
from mlx_stack.paths import StatePaths
from mlx_stack.private import make_dirs, secure_state_folder
from mlx_stack.supervisor.lock import StackLock, clean_leftovers
from mlx_stack.supervisor.loop import Supervisor
from mlx_stack.supervisor.runtime import OsRuntime


def _watch_stack_file(sup: Supervisor, path: Path) -> None:
    """Ask for a reload whenever the stack file changes (watchfiles; a daemon thread)."""
    from watchfiles import watch

    try:
        for changes in watch(path.parent, stop_event=sup.stop_requested, debounce=300,
                             rust_timeout=1000, yield_on_timeout=False):
            if any(Path(p).name == path.name for _, p in changes):
                sup.reload_requested.set()
    except Exception as exc:  # no watching (a vanished folder...): SIGHUP and `up` still reload
        sup.report.say(f"warning: not watching {path} for edits any more: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-stack-supervisor")
    parser.add_argument("--only", action="append", help="start only these services")
    args = parser.parse_args(argv)
    paths = StatePaths.from_env()
    lock = StackLock(paths.lock_file)
    try:
        # Checked here too, not only by the CLI: launchd and systemd start this directly.
        for note in secure_state_folder(paths.home, create=True):
            print(f"mlx-stack supervisor: {note}", file=sys.stderr, flush=True)
        make_dirs(paths.run)
        lock.acquire()
    except (MlxStackError, OSError) as exc:
        print(f"mlx-stack supervisor: {exc}", file=sys.stderr, flush=True)
        return getattr(exc, "exit_code", 5)
    runtime = OsRuntime()
    # Children hold the read end; only this process holds the write end, so they see
    # end-of-file exactly when the supervisor is gone (see childguard.py).
    lifeline, lifeline_w = os.pipe()
    # One backend key per supervisor start (backendkey.py): the same for every reload.
    backend_key = new_key()
    try:
        save_key(paths.backend_key, backend_key)
    except OSError as exc:
        print(f"mlx-stack supervisor: cannot write {paths.backend_key}: {exc.strerror}; "
              "`mlx-stack key --backend` will not work", file=sys.stderr, flush=True)
    sup = Supervisor(paths, lambda: load_plan(paths, backend_key), runtime,
                     only=set(args.only or []) or None, lifeline=lifeline, lock=lock)
    try:
        for name in clean_leftovers(paths.state_file):
            sup.report.say(f"ended {name}, left behind by a supervisor that died")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sup.stop_requested.set())
        signal.signal(signal.SIGHUP, lambda *_: sup.reload_requested.set())
        threading.Thread(target=_watch_stack_file, args=(sup, paths.stack_file), daemon=True,
                         name="stack-file-watch").start()
        sup.report.say(f"mlx-stack supervisor {os.getpid()} for {paths.home}")
        sup.run()
        sup.report.say("mlx-stack supervisor: every service stopped; exiting")
    except MlxStackError as exc:
        sup.report.say(f"mlx-stack supervisor: {exc}")
        return exc.exit_code
    finally:
        runtime.close()
        lock.release()
        os.close(lifeline_w)
    return 0
