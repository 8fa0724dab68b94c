"""A connection's replies in request order: requests run concurrently, replies do not.

Each request that is not answered at once keeps a :class:`_Slot` until its
reply is ready; a reply ready while no slot waits goes straight to ``out``,
the frames of the connection's next write. Sans-I/O: the connection writes
``out`` and charges ``held`` to the budget.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Replies"]


class _Slot:
    """A reply's place in a connection's order; ``frame`` is set once ready."""

    __slots__ = ("charge", "frame")

    def __init__(self, frame: bytes | None, charge: int) -> None:
        self.frame = frame
        self.charge = charge  # bytes held for it: the request while running, then the reply


class Replies:
    """The reply order of one connection.

    The request loop appends to ``slots`` and ``out`` itself, bound to locals,
    and adds to ``held`` as :meth:`answer` does: the same steps, inlined.
    """

    __slots__ = ("held", "out", "slots")

    def __init__(self) -> None:
        self.slots: deque[_Slot] = deque()
        """Replies waiting for the one at the head, which is still running."""
        self.out: list[bytes] = []
        """Frames in order, for the next write."""
        self.held = 0
        """Bytes the slots hold: a running request's charge, then its reply."""

    def answer(self, frame: bytes) -> bool:
        """Queue ``frame`` after every reply before it; ``True`` if it is in ``out``."""
        if self.slots:
            self.slots.append(_Slot(frame, len(frame)))
            self.held += len(frame)
            return False
        self.out.append(frame)
        return True

    def open(self, charge: int) -> _Slot:
        """Keep a reply's place in order, charging ``charge`` bytes until it is filled."""
        slot = _Slot(None, charge)
        self.slots.append(slot)
        self.held += charge
        return slot

    def fill(self, slot: _Slot, frame: bytes) -> None:
        """Put a finished reply in its place; move every reply now in order to ``out``."""
        slot.frame = frame
        self.held += len(frame) - slot.charge
        slot.charge = len(frame)
        slots = self.slots
        out = self.out
        while slots and slots[0].frame is not None:
            ready = slots.popleft()
            self.held -= ready.charge
            out.append(ready.frame)  # type: ignore[arg-type]

    def clear(self) -> None:
        """Forget every reply: nobody is left to send them to."""
        self.out.clear()
        self.slots.clear()
        self.held = 0
