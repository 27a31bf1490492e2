"""Runs in the proxy's launcher: leave out remote vector models whose identity is not accepted.

The generated config (``config.py``) lists every model of every remote; those that need an
identity check carry ``model_info.mlx_stack_identity``. The supervisor's prober
(``supervisor/remotes.py``) writes which of them it accepted to ``run/remotes.json`` and
restarts the proxy when that changes. Before LiteLLM reads its config, the launcher writes the
config LiteLLM really loads next to it, without the others: a remote ``local-embed`` whose
identity is unknown or different never serves a request here. The generated file stays as it
is (it is what ``up`` and the supervisor fingerprint, whatever the remotes say).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mlx_stack.atomic import write_atomic

REMOTES_FILE_ENV = "MLX_STACK_REMOTES_FILE"


def accepted_from_file(path: Path) -> frozenset[str]:
    """``remote/model`` names the supervisor accepted; none if the file is absent or bad."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return frozenset(str(n) for n in raw.get("accepted", ()))
    except (OSError, ValueError, AttributeError, TypeError):
        return frozenset()


def filter_config(config: Mapping[str, Any], accepted: frozenset[str]) -> dict[str, Any]:
    """The config without the identity-checked deployments that are not ``accepted``."""
    kept = []
    for d in config.get("model_list") or []:
        info = d.get("model_info") or {}
        if info.get("mlx_stack_identity") and \
                f"{info.get('mlx_stack_remote')}/{info.get('mlx_stack_model')}" not in accepted:
            continue
        kept.append(d)
    return {**config, "model_list": kept}


def effective_config(config_path: Path, remotes_file: Path) -> Path:
    """Write the config LiteLLM loads (``<name>.effective.yaml``, 0600) and return its path."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    out = config_path.with_name(config_path.stem + ".effective.yaml")
    text = ("# Written by the proxy's launcher from litellm.yaml, without the remote models "
            "whose identity is not accepted (run/remotes.json).\n"
            + yaml.safe_dump(filter_config(config, accepted_from_file(remotes_file)),
                             sort_keys=False))
    write_atomic(out, text, mode=0o600)
    return out
