"""The package version, read by the build backend and by the `version` proc."""

__version__ = "0.1.0"
