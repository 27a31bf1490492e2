"""Where the stack keeps its files: one state folder, ``~/.mlx-stack`` unless ``MLX_STACK_HOME``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StatePaths:
    """Every path under the state folder, derived in one place."""

    home: Path

    @classmethod
    def from_env(cls) -> StatePaths:
        """Absolute, so that the supervisor and services (started in ``run/``) agree on it."""
        raw = os.environ.get("MLX_STACK_HOME")
        return cls(Path(raw).expanduser().absolute() if raw else Path.home() / ".mlx-stack")

    @property
    def stack_file(self) -> Path:
        return self.home / "stack.yaml"

    @property
    def user_catalog(self) -> Path:
        """Extra catalog files of the user's own (``*.yaml``), merged over the shipped catalog."""
        return self.home / "catalog"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def log_file(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def commands(self) -> Path:
        """The folder the CLI drops commands into (``contract/commands.py``)."""
        return self.run / "commands"

    @property
    def state_file(self) -> Path:
        return self.run / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.run / "stack.lock"

    @property
    def backend_key(self) -> Path:
        """The running supervisor's backend key (0600), for ``mlx-stack key --backend``."""
        return self.run / "backend.key"

    @property
    def litellm_config(self) -> Path:
        return self.run / "litellm.yaml"

    def key_file(self, name: str = "proxy.key") -> Path:
        """The proxy's master key file (mode 0600), relative to the state folder unless absolute."""
        p = Path(name).expanduser()
        return p if p.is_absolute() else self.home / p
