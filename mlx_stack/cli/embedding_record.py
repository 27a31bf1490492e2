"""Which embeddings model served this stack, so a switch to another one is never silent.

Vectors from two models live in different spaces: an index built with one and queried with the
other returns wrong neighbours, without any error. `up` records the model that served the tier
(name, quantisation, and an identity of the weights); `init`, `up` and `status` warn when the
stack file names a different one (docs/embeddings.md, "Changing the embeddings model").
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_stack.atomic import write_atomic
from mlx_stack.config.modelfolder import fingerprint
from mlx_stack.config.plan import weights_path
from mlx_stack.config.stackfile import EmbeddingsTier
from mlx_stack.paths import StatePaths

GUIDE = "docs/embeddings.md#never-mix-vectors-from-two-models"


SCHEME = 2
"""How ``weights`` is computed: 2 is the served ``content_sha256``. A record of scheme 1 (a hash
of file names and sizes, before 2026-11) is compared by model and quantisation only, so an
upgrade does not look like a model switch; the next `up` records it anew."""


@dataclass(frozen=True)
class EmbeddingIdentity:
    model: str
    quant: str
    weights: str  # the folder's content_sha256, as the embeddings server reports it
    scheme: int = SCHEME

    def same_space(self, other: EmbeddingIdentity) -> bool:
        if self.scheme != other.scheme:
            return (self.model, self.quant) == (other.model, other.quant)
        return (self.model, self.quant, self.weights) == (other.model, other.quant, other.weights)

    def label(self) -> str:
        return f"{self.model} ({self.quant}, weights {self.weights[:12]})"


def identity_of(tier: EmbeddingsTier, folder: Path, paths: StatePaths) -> EmbeddingIdentity:
    cache = paths.home / "cache" / "fingerprints.json"
    return EmbeddingIdentity(tier.model.name, tier.quant,
                             fingerprint(folder, cache).content_sha256)


def _file(paths: StatePaths) -> Path:
    return paths.home / "embeddings-model.json"


def recorded(paths: StatePaths) -> EmbeddingIdentity | None:
    try:
        raw = json.loads(_file(paths).read_text(encoding="utf-8"))
        return EmbeddingIdentity(**{"scheme": 1, **raw["current"]})
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def record(paths: StatePaths, ident: EmbeddingIdentity) -> None:
    old = recorded(paths)
    body = {"current": asdict(ident), "recorded_at": time.time()}
    if old is not None and not old.same_space(ident):
        body["previous"] = asdict(old)
    write_atomic(_file(paths), json.dumps(body, indent=2) + "\n")


def current_identity(paths: StatePaths, tier: EmbeddingsTier | None) -> EmbeddingIdentity | None:
    """The identity the stack file's embeddings tier would serve (None if none or absent)."""
    if tier is None:
        return None
    folder = weights_path(tier.model, tier.quant)
    return identity_of(tier, folder, paths) if folder is not None else None


def mismatch(paths: StatePaths, ident: EmbeddingIdentity | None) -> str | None:
    """A warning if the recorded model differs from ``ident`` (None: no embeddings tier now)."""
    old = recorded(paths)
    if old is None or ident is None or old.same_space(ident):
        return None
    return (f"the embeddings model changes from {old.label()} to {ident.label()}: vectors "
            f"stored with the old model are incompatible with the new one; re-embed your "
            f"stored documents (see {GUIDE})")
