"""The backend key: proof that a request to a chat tier or the embeddings tier comes from the stack.

The backends listen on loopback ports that every local user and every program of this user
can reach. Without a key, another user of a shared Linux host could use (or, with mlx_lm's
``model`` field, disturb) the models; a key makes the proxy the one way in. So each supervisor
start makes a random key, gives it to the backends and the proxy through their environment
(``MLX_STACK_BACKEND_KEY``; never a command line, a config file or a log), and sends it in its
own probes. ``mlx-stack key --backend`` prints it from ``run/backend.key`` (0600) for a user
who calls a backend port directly.

It is not fingerprinted (see ``config/plan.ServiceSpec``): it never changes while a supervisor
runs, and the CLI, which plans without it, must compute the same fingerprints.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from mlx_stack.atomic import write_atomic
from mlx_stack.errors import StateError

#: The variable that carries the key to each backend and to the proxy.
KEY_ENV = "MLX_STACK_BACKEND_KEY"
#: What the proxy's generated config names as each deployment's ``api_key``.
LITELLM_API_KEY = f"os.environ/{KEY_ENV}"


def new_key() -> str:
    return "bk-" + secrets.token_urlsafe(32)


def save_key(path: Path, key: str) -> None:
    write_atomic(path, key + "\n", mode=0o600)


def read_key(path: Path) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise StateError(
            f"no backend key at {path}: the stack is not running (each supervisor start makes "
            "a new one); run `mlx-stack up` first"
        ) from None
    except OSError as exc:
        raise StateError(f"cannot read the backend key {path}: {exc.strerror}") from None
    return key


def bearer_matches(authorization: str | None, key: str) -> bool:
    """``Authorization: Bearer KEY``, compared in constant time."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              key.encode())  # fmt: skip
