"""What a model folder holds, defined once: its weight files, their size, and its identity.

Two servers give comparable vectors only if their weights, tokenizer and architecture config
are byte-identical, so the identity hashes exactly those files. The embeddings server reports it
as ``content_sha256`` in ``/v1/models``; `up` records the same value for the stack
(``cli/embedding_record.py``), so a switch of model is caught whichever side looks.

Standard library only: the embeddings server imports this before MLX.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_stack.atomic import write_atomic

WEIGHT_GLOB = "**/*.safetensors"
"""The files mlx-lm and mlx-embeddings load weights from (sentence-transformers Dense folders
included); ``.bin``/``.gguf`` files in a hub snapshot are not served, so they are not counted."""
IDENTITY_FILES = ("config.json", "tokenizer.json")
_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fingerprint:
    content_sha256: str
    files: tuple[str, ...]
    #: The Hugging Face commit when the folder is a hub-cache snapshot, else None.
    revision: str | None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, sorted (symlinks into the hub cache followed)."""
    return sorted(p for p in folder.glob(WEIGHT_GLOB) if p.is_file())


def weights_size(folder: Path) -> int | None:
    """Bytes of the weight files: what a loading server's memory grows towards."""
    try:
        return sum(p.stat().st_size for p in weight_files(folder)) or None
    except OSError:
        return None


def fingerprint(folder: Path, cache: Path | None = None) -> Fingerprint:
    """Hash the weight files, ``config.json`` and ``tokenizer.json``.

    Each file contributes its relative name and its own SHA-256, in sorted order, so renaming
    or moving a file changes the result as well as editing it. With ``cache`` (a JSON file),
    a file's hash is reused while its size, mtime and inode are unchanged, so `status` does not
    re-read gigabytes of weights.
    """
    files = sorted(
        set(weight_files(folder))
        | {folder / n for n in IDENTITY_FILES if (folder / n).is_file()}
    )
    memo = _read_cache(cache)
    fresh: dict[str, str] = {}
    outer = hashlib.sha256()
    names: list[str] = []
    for file in files:
        name = file.relative_to(folder).as_posix()
        names.append(name)
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = memo.get(key) or _sha256(file)
        fresh[key] = digest
        outer.update(f"{name}\0{digest}\n".encode())
    if cache is not None and any(k not in memo for k in fresh):
        with contextlib.suppress(OSError):
            write_atomic(cache, json.dumps({**memo, **fresh}), mode=0o600)
    revision = folder.name if folder.parent.name == "snapshots" and _SNAPSHOT.match(
        folder.name) else None
    return Fingerprint(outer.hexdigest(), tuple(names), revision)


def _read_cache(cache: Path | None) -> dict[str, str]:
    if cache is None:
        return {}
    try:
        if cache.stat().st_size > 4 * 1024 * 1024 or cache.stat().st_uid != os.getuid():
            return {}
        raw = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
