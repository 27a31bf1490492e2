"""Rolling replacement of a tier's replicas: one at a time, each out of the route first.

A reload that changes a tier with replicas, a model change, or `restart embeddings` replaces
its servers one by one: take the replica out of the route (``in_route: false`` in the snapshot;
the proxy's gate and fast lane send it no new request), wait ``DRAIN_S`` for the proxy to see
that, stop it (SIGTERM: the embeddings server finishes its requests in flight before it
exits), start it (with the new definition, if any), wait until its real probe passes, then the
next. The other replicas serve meanwhile, so clients see no failure.

:func:`next_step` decides (pure, table-tested); :class:`Rolls` applies the decisions through
the loop's driver. If a replacement ends ``fatal`` (the new definition cannot start), the roll
stops there: the replicas not yet replaced keep serving their old definition.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mlx_stack.supervisor.driver import ServiceDriver
from mlx_stack.supervisor.managed import Managed
from mlx_stack.supervisor.states import ServiceState

S = ServiceState
DRAIN_S = 1.0
"""Out of the route before the stop: the supervisor writes its snapshot within a tick (0.1 s)
and the proxy re-reads it at most every 0.2 s; the rest is margin."""


class Phase(str, enum.Enum):
    DRAIN = "drain"  # out of the route; waiting for the proxy to see it
    REPLACE = "replace"  # stopped and restarting; waiting until it is ready


class StepKind(str, enum.Enum):
    WAIT = "wait"
    DRAIN = "drain"  # take ``name`` out of the route
    REPLACE = "replace"  # stop ``name`` and start it again (with its new definition)
    SKIP = "skip"  # ``name`` is not running: apply its new definition, nothing to drain
    PUT_BACK = "put_back"  # ``name`` is ready again: on to the next
    ABORT = "abort"  # ``name`` could not come back: stop the roll here
    DONE = "done"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    name: str = ""


@dataclass
class Roll:
    """One tier's replacement in progress."""

    group: str
    reason: str
    queue: list[str] = field(default_factory=list)  # replicas still to replace, in order
    current: str | None = None
    phase: Phase = Phase.DRAIN
    drain_until: float = 0.0


def next_step(roll: Roll, states: Mapping[str, ServiceState], members: tuple[str, ...],
              now: float) -> Step:
    """What to do next for ``roll``, given each replica's state (``members``: the tier's)."""
    if roll.current is None:
        if not roll.queue:
            return Step(StepKind.DONE)
        name = roll.queue[0]
        if not states.get(name, S.STOPPED).running:
            return Step(StepKind.SKIP, name)
        others_ready = any(states.get(o) is S.READY for o in members if o != name)
        # With no other replica serving there is nobody to drain to: replace at once.
        return Step(StepKind.DRAIN if others_ready else StepKind.REPLACE, name)
    name = roll.current
    if roll.phase is Phase.DRAIN:
        return Step(StepKind.REPLACE, name) if now >= roll.drain_until else Step(StepKind.WAIT)
    state = states.get(name, S.STOPPED)
    if state is S.READY:
        return Step(StepKind.PUT_BACK, name)
    if state in (S.FATAL, S.STOPPED):
        return Step(StepKind.ABORT, name)
    return Step(StepKind.WAIT)


class Rolls:
    """The rolls in progress, one per tier, applied through the driver on each tick."""

    def __init__(self, driver: ServiceDriver, say: Callable[[str], None]) -> None:
        self.driver = driver
        self.say = say
        self.active: dict[str, Roll] = {}

    def add(self, group: str, names: list[str], reason: str) -> None:
        """Queue ``names`` (replicas of ``group``) for replacement, after those queued."""
        roll = self.active.get(group)
        if roll is None:
            roll = self.active[group] = Roll(group, reason)
            self.say(f"{group}: replacing {', '.join(names)} one at a time ({reason})")
        for name in names:
            if name not in roll.queue and name != roll.current:
                roll.queue.append(name)

    def forget(self, name: str) -> None:
        """``name`` needs no replacement any more (its edit was undone, or it was removed)."""
        for roll in self.active.values():
            if name in roll.queue:
                roll.queue.remove(name)

    def pending(self, name: str) -> bool:
        return any(name in r.queue or name == r.current for r in self.active.values())

    def tick(self, services: Mapping[str, Managed], groups: Mapping[str, tuple[str, ...]],
             now: float) -> None:
        for group, roll in list(self.active.items()):
            members = groups.get(group, ())
            for _ in range(len(members) + 2):  # steps that need no waiting run in one tick
                states = {n: services[n].state for n in members if n in services}
                roll.queue = [n for n in roll.queue if n in services]
                step = next_step(roll, states, members, now)
                if step.kind is StepKind.WAIT:
                    break
                if step.kind is StepKind.DONE:
                    del self.active[group]
                    self.say(f"{group}: every replica replaced")
                    break
                self._apply(roll, step, services[step.name], now)

    def _apply(self, roll: Roll, step: Step, m: Managed, now: float) -> None:
        if step.kind is StepKind.DRAIN:
            roll.queue.remove(m.name)
            roll.current, roll.phase, roll.drain_until = m.name, Phase.DRAIN, now + DRAIN_S
            m.in_route = False
            self.driver.on_change()
            self.driver.mark(m, f"{m.name}: out of the route, draining before the replacement")
        elif step.kind is StepKind.REPLACE:
            if m.name in roll.queue:
                roll.queue.remove(m.name)
            roll.current, roll.phase = m.name, Phase.REPLACE
            self._renew(m)
            self.driver.stop(m, S.BACKOFF, f"{roll.reason} (rolling replacement)")
            m.in_route = True  # not ready until the new process passes its probe
        elif step.kind is StepKind.SKIP:
            roll.queue.remove(m.name)
            self._renew(m)
            if m.state in (S.FATAL, S.BACKOFF):
                self.driver.set_state(m, S.STOPPED, "")
        elif step.kind is StepKind.PUT_BACK:
            roll.current = None
            self.driver.mark(m, f"{m.name}: replaced, back in the route")
        elif step.kind is StepKind.ABORT:
            del self.active[roll.group]
            left = ", ".join(roll.queue) or "none"
            self.say(f"{roll.group}: rolling replacement stopped: {m.name} is {m.state.value} "
                     f"after its replacement; not replaced: {left} (they keep serving). See "
                     f"`mlx-stack logs {m.name}`; `mlx-stack restart {roll.group}` tries again")

    @staticmethod
    def _renew(m: Managed) -> None:
        """Take the pending definition (an edit of the stack file), clear the failure count."""
        if m.pending_spec is not None:
            m.spec, m.pending_spec = m.pending_spec, None
        m.wanted = True
        m.next_start_at = 0.0
        m.consecutive_failures = 0
        m.restart_times.clear()
