"""The proxy's master key: generated once, kept in a 0600 file, never printed into logs.

It reaches the LiteLLM child only through its environment (the generated config names the
variable, not the value), so it is never written into the config file or the logs.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from mlx_stack.atomic import write_atomic
from mlx_stack.errors import StateError

ENV_VAR = "MLX_STACK_PROXY_KEY"


def ensure_key(path: Path) -> bool:
    """Create the key file if absent; return True if a new key was made."""
    if path.exists():
        return False
    write_atomic(path, "sk-" + secrets.token_urlsafe(32) + "\n", mode=0o600)
    return True


class KeyFileError(Exception):
    """A key file that cannot be read; ``missing`` when there is no file at all."""

    def __init__(self, reason: str, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def read_key_file(path: Path) -> str:
    """The stripped text of a secret's file, made 0600 first if others could read it.

    One reader for every key the stack holds (its own proxy key, a remote's, an external
    server's), so each is repaired and refused the same way; callers word the error.
    """
    try:
        info = path.stat()
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise KeyFileError("no such file", missing=True) from None
    except UnicodeDecodeError:
        raise KeyFileError("not UTF-8 text") from None
    except OSError as exc:
        raise KeyFileError(exc.strerror or str(exc)) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(path, 0o600)  # a key readable by others is repaired, not trusted as is
    return key


def read_key(path: Path) -> str:
    try:
        key = read_key_file(path)
    except KeyFileError as exc:
        if exc.missing:
            raise StateError(
                f"no proxy key at {path}; run `mlx-stack init --exist-ok` to create one"
            ) from None
        raise StateError(f"cannot read the proxy key {path}: {exc.reason}") from None
    if not key.startswith("sk-") or len(key) < 20:
        raise StateError(
            f"the proxy key in {path} is malformed (it must start with 'sk-' and be long); "
            "delete the file and run `mlx-stack init --exist-ok` to make a new one"
        )
    return key
