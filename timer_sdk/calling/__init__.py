"""The client's parts; :mod:`timer_sdk.client` assembles them into ``TimerClient``."""
