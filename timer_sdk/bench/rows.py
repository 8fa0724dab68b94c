"""What a run measures and what it reports: :class:`Settings`, :class:`Row`, the targets."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .._extras import install_hint

__all__ = [
    "GROUPS",
    "TARGETS",
    "WORKER_COUNTS",
    "Row",
    "Settings",
    "Target",
    "available_loops",
    "estimate_seconds",
    "progress",
    "start_progress",
]

GROUPS = ("memory", "ping-pong", "pipelined", "workers", "client", "codec")
WORKER_COUNTS = (1, 2, 4)
"""The ``serve --workers N`` that the workers group measures."""


@dataclass(frozen=True)
class Target:
    """A goal the project set itself: not a measurement of anyone."""

    bound: str
    """``">= 1.2"`` or ``"<= 12"``."""
    basis: str
    """``"models floor"``: the bound is on ours / models floor; ``"value"``: on ours itself;
    ``"untimed"``: on ours / ours without a timeout, the median of the rounds' ratios."""

    def met(self, row: Row) -> bool | None:
        value: float | None
        if self.basis == "untimed":
            ratio = row.detail.get("vs_untimed")
            value = None if ratio is None else float(ratio)
        else:
            value = row.models_ratio if self.basis == "models floor" else row.ours
        if value is None or math.isnan(value):
            return None
        op, number = self.bound.split()
        return value >= float(number) if op == ">=" else value <= float(number)


TARGETS: dict[str, Target] = {
    "pipelined echo unix 4x32": Target(">= 1.2", "models floor"),
    "ping-pong echo unix p50": Target("<= 1.0", "models floor"),
    "ping-pong echo tcp p50": Target("<= 1.0", "models floor"),
    "ping-pong echo unix p99": Target("<= 1.5", "models floor"),
    "client gather echo": Target(">= 0.9", "models floor"),
    "client gather echo, timeout=5": Target(">= 0.95", "untimed"),
    "client gather echo, client timeout=5": Target(">= 0.95", "untimed"),
    "server CPU per pipelined echo unix 4x32": Target("<= 12", "value"),
}
"""The project's own targets, by row name, on every event loop."""


@dataclass(frozen=True)
class Settings:
    """What to run, and for how long."""

    quick: bool = False
    loops: tuple[str, ...] = ()
    """Event loops to measure; empty means asyncio, and uvloop too when installed."""
    groups: tuple[str, ...] = GROUPS
    warmup: float | None = None
    duration: float | None = None
    rounds: int | None = None
    progress: bool = True
    """Say on stderr what is running."""
    against: str | None = None
    """A running server (``unix:PATH`` or ``tcp:127.0.0.1:PORT``) to measure beside ours."""

    def resolved(self) -> Settings:
        """Fill in what was left to the defaults of quick or normal mode."""
        loops = self.loops or available_loops()
        for name in loops:
            if name not in ("asyncio", "uvloop"):
                raise ValueError(f"unknown event loop {name!r}")
            if name == "uvloop" and "uvloop" not in available_loops():
                raise ValueError(f"--loop uvloop needs the fast extra: {install_hint('fast')}")
        for group in self.groups:
            if group not in GROUPS:
                raise ValueError(f"unknown group {group!r}; choose from {', '.join(GROUPS)}")
        if self.against is not None:
            _check_against(self.against)
        return Settings(
            quick=self.quick,
            loops=tuple(loops),
            groups=self.groups,
            warmup=self.warmup if self.warmup is not None else 0.05 if self.quick else 0.3,
            duration=self.duration if self.duration is not None else 0.25 if self.quick else 1.5,
            rounds=self.rounds if self.rounds is not None else 1 if self.quick else 3,
            progress=self.progress,
            against=self.against,
        )


def _check_against(address: str) -> None:
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest:
        return
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not port.isdigit():
        raise ValueError(f"--against wants unix:PATH or tcp:127.0.0.1:PORT, not {address!r}")
    if host.strip("[]") not in ("127.0.0.1", "::1"):
        raise ValueError(
            f"--against: the benchmark loads only loopback (127.0.0.1, ::1), not {host}"
        )


@dataclass
class Row:
    """One measurement: ours beside the models floor and the floor (and ``--against``)."""

    group: str
    name: str
    unit: str
    ours: float
    floor: float
    loop: str
    better: str
    """``higher`` or ``lower``: which way a number is good."""
    ratio: float = 0.0
    """``ours / floor``."""
    target: str | None = None
    """The bound of this row's target (see :data:`TARGETS`), e.g. ``">= 1.2"``."""
    met: bool | None = None
    reference: float | None = None
    """Always ``None``: the table no longer quotes numbers that were not measured here."""
    detail: dict[str, Any] = field(default_factory=dict)
    models_floor: float | None = None
    """The same measurement of the models floor (``models_floor.py``)."""
    models_ratio: float | None = None
    """``ours / models_floor``."""
    target_basis: str | None = None
    """What ``target`` bounds: ``"models floor"`` (``models_ratio``) or ``"value"`` (``ours``)."""
    against: float | None = None
    """The same measurement of the ``--against`` server, when it could be made."""
    against_skipped: str | None = None
    """Why the ``--against`` server has no number in this row."""

    def __post_init__(self) -> None:
        self.ratio = self.ours / self.floor if self.floor else float("nan")
        if self.models_floor is not None:
            self.models_ratio = self.ours / self.models_floor if self.models_floor else math.nan
        target = TARGETS.get(self.name)
        if target is not None:
            self.target = target.bound
            self.target_basis = target.basis
            self.met = target.met(self)


def available_loops() -> tuple[str, ...]:
    """Return the event loops this interpreter can run."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ("asyncio",)
    return ("asyncio", "uvloop")


# What each group takes, as measured on a 2-core machine: seconds of set-up per event
# loop (server and worker processes to start), and measured windows per event loop (each
# a warm-up and a duration, per round, for ours and both floors). Codec runs once.
_COSTS = {
    "memory": (3.0, 0),
    "ping-pong": (0.0, 4),
    "pipelined": (0.0, 6),
    "workers": (8.5, 3),
    "client": (2.5, 4),
    "codec": (3.0, 0),
}


def estimate_seconds(settings: Settings) -> float:
    """About how long a run of these (resolved) settings takes, to say up front."""
    assert settings.warmup is not None
    assert settings.duration is not None
    assert settings.rounds is not None
    window = 3 * settings.rounds * (settings.warmup + settings.duration)
    total = 0.0
    for group in settings.groups:
        setup, windows = _COSTS[group]
        times = 1 if group == "codec" else len(settings.loops)
        total += times * (setup + windows * window)
    return total


_progress_started: list[float] = []  # when this run started, if it reports progress


def start_progress(enabled: bool) -> None:
    """Start the clock of :func:`progress`, or silence it."""
    _progress_started[:] = [time.perf_counter()] if enabled else []


def progress(message: str) -> None:
    """Say on stderr what is running, when the run asked for it."""
    if _progress_started:
        elapsed = time.perf_counter() - _progress_started[0]
        print(f"bench: {elapsed:5.1f} s  {message}", file=sys.stderr, flush=True)
