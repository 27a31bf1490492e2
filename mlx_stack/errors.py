"""The one exception tree of mlx-stack.

Every message says what happened and what to do next; the CLI prints ``str(error)`` and exits
with ``error.exit_code``, so no user ever sees a traceback for a failure we foresaw.

    MlxStackError
    ├── ConfigError            a YAML file (stack file, catalog) is malformed or invalid
    ├── CatalogError           a model or quantisation is not in the catalog
    ├── UnknownServiceError    a command names a service the stack does not have
    ├── PortInUseError         a port the stack needs is held by another program
    ├── ServiceStartError      a service exited or never became ready
    ├── StateError             the state folder is unusable (permissions, a corrupt file)
    └── PullError              a model could not be downloaded
"""

from __future__ import annotations


class MlxStackError(Exception):
    """Base class: a failure with a message fit for the user."""

    exit_code = 1


class ConfigError(MlxStackError):
    """A configuration file failed to parse or validate.

    ``problems`` holds one line per problem, each naming the file, line and field path, so that
    all mistakes of a file are reported at once rather than one per run.
    """

    exit_code = 2

    def __init__(self, path: object, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(
            f"{self.path}: {len(problems)} {noun}; nothing was started or changed:\n{listing}"
        )


class CatalogError(MlxStackError):
    exit_code = 2


class UnknownServiceError(MlxStackError):
    """A typo in a service name: refused before anything is sent or started."""

    exit_code = 2


class PortInUseError(MlxStackError):
    exit_code = 3


class ServiceStartError(MlxStackError):
    exit_code = 4


class StateError(MlxStackError):
    exit_code = 5


class PullError(MlxStackError):
    exit_code = 6
