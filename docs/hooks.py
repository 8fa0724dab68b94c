"""mkdocs hooks: the command-line page gets each command's --help, from the parser itself."""

from __future__ import annotations

import argparse
from typing import Any

from timer_sdk.cli_help import build_parser

MARKER = "<!-- cli-help -->"


def _helps() -> list[tuple[str, str]]:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = [("timer-sdk", parser.format_help())]
    found += [(f"timer-sdk {name}", sub.format_help()) for name, sub in commands.choices.items()]
    return found


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    sections = [f"## `{name}`\n\n```text\n{text.rstrip()}\n```\n" for name, text in _helps()]
    return markdown.replace(MARKER, "\n".join(sections))
