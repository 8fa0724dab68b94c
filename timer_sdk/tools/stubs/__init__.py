"""``timer-sdk stubs``: typed clients for other languages, generated from the one declaration.

Each target renders :class:`~timer_sdk.wire.description.ApiDescription` (the same
description the schema export renders) into files; :func:`render` is
sans-I/O and :func:`generate` writes the files. A new language is one more
entry of :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ...wire.description import ApiDescription, describe
from . import typescript

__all__ = ["TARGETS", "add_arguments", "generate", "render", "run_command"]

TARGETS: dict[str, Callable[[ApiDescription], dict[str, str]]] = {
    "typescript": typescript.render,
}
"""Every target language, by name: a description in, files by relative path out."""


def render(lang: str, api: ApiDescription | None = None) -> dict[str, str]:
    """The files of the ``lang`` client of ``api`` (by default the SDK's own API)."""
    if lang not in TARGETS:
        raise ValueError(f"unknown language {lang!r}; the languages are: {', '.join(TARGETS)}")
    return TARGETS[lang](api or describe())


def generate(lang: str, out: Path, api: ApiDescription | None = None) -> list[Path]:
    """Write the ``lang`` client into ``out`` (created if needed); return the paths written.

    Files of an earlier generation are overwritten; other files are left alone.
    """
    written = []
    for relative, text in render(lang, api).items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``timer-sdk stubs``."""
    parser.add_argument(
        "--lang", required=True, choices=sorted(TARGETS), help="the client's language"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="the folder to write it into"
    )


def run_command(args: argparse.Namespace) -> int:
    """Run ``timer-sdk stubs``."""
    written = generate(args.lang, args.out)
    print(f"wrote {len(written)} files of the {args.lang} client to {args.out}")
    if args.lang == "typescript":
        print(f"next: cd {args.out} && npm install && npm run build")
    return 0
