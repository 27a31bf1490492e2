"""Identify the exact weights served, so a client can tell two vector spaces apart.

Two servers give comparable vectors only if their weights, tokenizer and architecture config
are byte-identical (and pooling/normalisation match, which ``/v1/models`` lists separately).
``content_sha256`` hashes those files; ``revision`` is the Hugging Face commit when the folder
is a hub-cache snapshot (``.../snapshots/<commit>/``), else ``None``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fingerprint:
    content_sha256: str
    files: tuple[str, ...]
    revision: str | None


def of_folder(path: Path) -> Fingerprint:
    """Hash weights (``*.safetensors`` at any depth), ``config.json`` and ``tokenizer.json``.

    Each file contributes its relative name and its own SHA-256, in sorted order, so renaming
    or moving a file changes the result as well as editing it.
    """
    files = sorted(
        {p for p in path.glob("**/*.safetensors") if p.is_file()}
        | {path / name for name in ("config.json", "tokenizer.json") if (path / name).is_file()}
    )
    outer = hashlib.sha256()
    names: list[str] = []
    for file in files:
        name = file.relative_to(path).as_posix()
        names.append(name)
        outer.update(f"{name}\0{_sha256(file)}\n".encode())
    parent = path.parent
    revision = path.name if parent.name == "snapshots" and _SNAPSHOT.match(path.name) else None
    return Fingerprint(outer.hexdigest(), tuple(names), revision)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
