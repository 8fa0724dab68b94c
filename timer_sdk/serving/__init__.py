"""The server's parts; :mod:`timer_sdk.server` assembles them into ``Server``."""
