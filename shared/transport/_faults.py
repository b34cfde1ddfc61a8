"""Seeded network faults for one link: drop, delay, duplicate, reorder, partition.

The decision logic is sans-IO: :meth:`FaultInjector.plan_send` turns one
outgoing frame into a list of ``(delay_seconds, frame)`` to transmit (empty when
dropped). The channel or server that owns the link carries them out. A plan is
switched at run time with :meth:`FaultInjector.configure`; the same seed gives
the same sequence of decisions.
"""

from __future__ import annotations

import random

import attrs


@attrs.frozen
class FaultPlan:
    """What to do to frames sent on a link. Probabilities are in [0, 1]."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay_min: float = 0.0  # seconds
    delay_max: float = 0.0
    partition: bool = False  # drop everything
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(
            self.partition or self.drop or self.duplicate or self.reorder or self.delay_max > 0
        )


@attrs.frozen
class FaultStats:
    frames: int
    dropped: int
    duplicated: int
    reordered: int
    delayed: int


# A frame held back for reordering goes out after the next frame, or after this
# long if no other frame follows.
REORDER_HOLD = 0.05


@attrs.define(eq=False)
class FaultInjector:
    plan: FaultPlan = attrs.field(factory=FaultPlan)
    _rng: random.Random = attrs.field(init=False)
    _held: bytes | None = attrs.field(init=False, default=None)
    _plan_active: bool = attrs.field(init=False, default=False)
    frames: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    delayed: int = 0

    def __attrs_post_init__(self) -> None:
        self.configure(self.plan)

    def configure(self, plan: FaultPlan) -> None:
        """Switch plans; the seed restarts the decision sequence."""
        self.plan = plan
        self._plan_active = plan.active  # read on every send: keep it a plain bool
        self._rng = random.Random(plan.seed)

    @property
    def active(self) -> bool:
        return self._plan_active or self._held is not None

    @property
    def holding(self) -> bool:
        """A frame is held back, waiting to be passed by the next one."""
        return self._held is not None

    def plan_send(self, frame: bytes) -> list[tuple[float, bytes]]:
        p, rng = self.plan, self._rng
        self.frames += 1
        if p.partition or (p.drop and rng.random() < p.drop):
            self.dropped += 1
            return []
        delay = 0.0
        if p.delay_max > 0:
            delay = rng.uniform(p.delay_min, p.delay_max)
            self.delayed += 1
        out = [(delay, frame)]
        if p.duplicate and rng.random() < p.duplicate:
            self.duplicated += 1
            out.append((delay, frame))
        if self._held is not None:
            out.append((delay, self._held))
            self._held = None
        elif p.reorder and rng.random() < p.reorder:
            self.reordered += 1
            self._held = frame
            return out[1:]
        return out

    def release_held(self) -> bytes | None:
        """The frame held for reordering, if no later frame came to pass it."""
        held, self._held = self._held, None
        return held

    def statistics(self) -> FaultStats:
        return FaultStats(self.frames, self.dropped, self.duplicated, self.reordered, self.delayed)
