"""A connection's replies in request order: each request keeps a slot until answered."""

from __future__ import annotations

__all__ = ["_Slot"]


class _Slot:
    """A reply's place in a connection's order; ``frame`` is set once ready."""

    __slots__ = ("charge", "frame")

    def __init__(self, frame: bytes | None, charge: int) -> None:
        self.frame = frame
        self.charge = charge  # bytes held for it: the request while running, then the reply
