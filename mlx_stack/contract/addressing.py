"""What a service name in a command means when a tier has replicas.

``embeddings`` is both the first replica's service name and the tier's: commands (`restart`,
`up --tier`, `down --tier`, `logs`) that name a tier with replicas address every replica;
``embeddings-1`` addresses the first replica alone; ``embeddings-2``... their own replica. A
tier of one server is one service, as before replicas existed. The CLI (from the plan or the
snapshot) and the supervisor (from its specs) answer with these same functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def groups_of(services: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """(service name, group) pairs -> each group of more than one service, in order."""
    out: dict[str, list[str]] = {}
    for name, group in services:
        if group:
            out.setdefault(group, []).append(name)
    return {g: tuple(names) for g, names in out.items() if len(names) > 1}


def aliases_of(groups: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """``embeddings-1`` -> ``embeddings``: the first replica alone."""
    return {f"{g}-1": names[0] for g, names in groups.items()}


def resolve(name: str, groups: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The services a command naming ``name`` addresses (``name`` itself if not special)."""
    if name in groups:
        return groups[name]
    return (aliases_of(groups).get(name, name),)
