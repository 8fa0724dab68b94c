"""The package version, read by the build backend and by the `version` proc."""

__version__ = "0.1.0"
"""This package's version; the build reads it from here, and ``version()`` answers with it."""
