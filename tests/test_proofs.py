"""The tests that docs/limits.md names as proof of each promise exist, by those names.

A promise whose proof was renamed or deleted would otherwise still read as proved.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIMITS = ROOT / "docs" / "limits.md"
NAMED = re.compile(r"`(test_\w+\.py)?(?:::(\w+))?`")


def proofs(text: str) -> list[tuple[str, str | None]]:
    """Each (test file, test name or None) that a "proved by" column names, in order.

    ``::name`` alone means a test in the file named just before it.
    """
    found: list[tuple[str, str | None]] = []
    column = None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None  # the table ended
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if "proved by" in cells:
            column = cells.index("proved by")
            continue
        if column is None or len(cells) <= column:
            continue
        file = None
        for match in NAMED.finditer(cells[column]):
            file = match.group(1) or file
            assert file is not None, f"{match.group(0)} names no file before it: {line}"
            found.append((file, match.group(2)))
    return found


def defined_tests(path: Path) -> set[str]:
    """The test functions a test module defines at its top level."""
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_the_reader_finds_names_of_each_form() -> None:
    table = (
        "| when | what | proved by |\n| --- | --- | --- |\n"
        "| a | b | `test_a.py::test_one`, `::test_two` |\n"
        "| c | d | `test_b.py` (attacks) |\n"
    )
    assert proofs(table) == [
        ("test_a.py", "test_one"),
        ("test_a.py", "test_two"),
        ("test_b.py", None),
    ]


def test_every_proof_named_in_the_limits_doc_exists() -> None:
    named = proofs(LIMITS.read_text())
    assert len(named) >= 10  # the table was read, not skipped
    missing = []
    for file, name in named:
        path = Path(__file__).parent / file
        if not path.is_file():
            missing.append(file)
        elif name is not None and name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert missing == [], "docs/limits.md names tests that do not exist"


@pytest.mark.parametrize("line", ["| x | y | `::test_orphan` |"])
def test_a_name_without_a_file_is_an_error(line: str) -> None:
    with pytest.raises(AssertionError, match="names no file"):
        proofs("| when | what | proved by |\n| --- | --- | --- |\n" + line)
