"""The command line (``timer-sdk``) and what only it uses."""
