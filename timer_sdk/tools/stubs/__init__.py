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
from . import go, typescript

__all__ = ["TARGETS", "add_arguments", "generate", "render", "run_command"]

TARGETS: dict[str, tuple[Callable[[ApiDescription, str], dict[str, str]], str]] = {
    "go": (go.render, go.DEFAULT_MODULE),
    "typescript": (typescript.render, typescript.PACKAGE),
}
"""Every target language, by name: its renderer (a description and the package's
name in, files by relative path out) and the package's name by default."""


def render(
    lang: str, api: ApiDescription | None = None, *, module: str | None = None
) -> dict[str, str]:
    """The files of the ``lang`` client of ``api`` (by default the SDK's own API).

    ``module`` names the package: Go's module path, or the npm package's name.
    """
    if lang not in TARGETS:
        raise ValueError(f"unknown language {lang!r}; the languages are: {', '.join(TARGETS)}")
    renderer, default = TARGETS[lang]
    return renderer(api or describe(), module or default)


def generate(
    lang: str, out: Path, api: ApiDescription | None = None, *, module: str | None = None
) -> list[Path]:
    """Write the ``lang`` client into ``out`` (created if needed); return the paths written.

    Files of an earlier generation are overwritten; other files are left alone.
    """
    written = []
    for relative, text in render(lang, api, module=module).items():
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
    parser.add_argument(
        "--module",
        metavar="NAME",
        help=(
            "the package's name: the Go module path (default "
            f"{go.DEFAULT_MODULE}) or the npm name (default {typescript.PACKAGE})"
        ),
    )


def run_command(args: argparse.Namespace) -> int:
    """Run ``timer-sdk stubs``."""
    written = generate(args.lang, args.out, module=args.module)
    print(f"wrote {len(written)} files of the {args.lang} client to {args.out}")
    if args.lang == "typescript":
        print(f"next: cd {args.out} && npm install && npm run build")
    else:
        print(f"next: cd {args.out} && go vet ./... && go build ./...")
    return 0
