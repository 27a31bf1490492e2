"""Small programs the process tests run as real children (no model needed), and markers."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

PY = sys.executable

#: Sleeps forever; exits on SIGTERM.
SLEEPER = [PY, "-c", "import time\nwhile True: time.sleep(1)"]

#: Ignores SIGTERM, so only SIGKILL ends it.
STUBBORN = [
    PY,
    "-c",
    textwrap.dedent("""\
    import signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print('ignoring SIGTERM', flush=True)
    while True: time.sleep(1)
    """),
]

#: Starts a grandchild in the same process group, then sleeps: `down` must end both.
WITH_GRANDCHILD = [
    PY,
    "-c",
    textwrap.dedent("""\
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'])
    print('grandchild', child.pid, flush=True)
    while True: time.sleep(1)
    """),
]

#: Tests that give a file to another uid or group (``os.chown``) to check that it is refused:
#: only root may do that. (Root passes every permission check, so such tests check the owner
#: and mode logic, never an EACCES.)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="os.chown to another uid needs root")
