"""mkdocs hooks: the command-line page gets each command's --help, from the parser itself."""

from __future__ import annotations

from typing import Any

from timer_sdk.tools.cli_help import help_texts

MARKER = "<!-- cli-help -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    sections = [
        f"## `{command}`\n\n```text\n{text.rstrip()}\n```\n"
        for command, text in help_texts().items()
    ]
    return markdown.replace(MARKER, "\n".join(sections))
