"""``python -m mlx_stack.chat ARGS``: mlx_lm.server's arguments, served behind the guard.

The BLAS is loaded first, chosen by measurement on the served model's own shapes, as the
embeddings server does: it must precede ``mlx.core``, which ``.server`` imports. Choosing here
rather than in the supervisor's plan keeps ``status`` and ``up`` from timing libraries.
"""

import sys
from pathlib import Path

from mlx_stack.embeddings.cpu import blas


def _model_folder(argv: list[str]) -> Path | None:
    """The ``--model`` argument if it names a local folder (a hub name has no shapes to read)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--model" and i + 1 < len(argv) else None
        if arg.startswith("--model="):
            value = arg.split("=", 1)[1]
        if value is not None:
            return Path(value) if Path(value).is_dir() else None
    return None


info = blas.preload(model=_model_folder(sys.argv[1:]))
print(f"mlx-stack chat: BLAS {info.describe()}", file=sys.stderr, flush=True)

from .server import main  # noqa: E402  (after the BLAS: it imports mlx.core)

main()
