"""Sphinx configuration of the API reference: python -m sphinx -W -n -b html docs site.

Strict: every warning fails the build (-W), and every name in a signature or
a cross-reference must have an entry (-n). The site opens from disk
(site/index.html) and loads nothing from outside the machine: furo bundles
its fonts and scripts, and the search index is a local file.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "_ext")]

import timer_sdk  # noqa: E402

project = "timer-sdk"
author = "the timer-sdk authors"
copyright = "the timer-sdk authors"
release = version = timer_sdk.__version__

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
    "timer_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext", "_templates"]
nitpicky = True
# Annotations from the standard library and pydantic have no entry here: the
# names are shown, not linked, and everything of ours must resolve.
nitpick_ignore_regex = [
    ("py:class", r"(ssl|asyncio|abc|collections\.abc|typing|types|pydantic|annotated_types)\..*"),
    ("py:class", r"SSLContext|AbstractEventLoop|CollectorRegistry|(prometheus_client\..*)"),
    # Type variables (P, R, C) stand for the types at the call: no entry of their own.
    ("py:(class|obj)", r"timer_sdk\.[\w.]*\.[A-Z]"),
]

# autodoc: the docstrings are reST for help() and editors; signatures show
# defaults as written (0o600, not 384), and types by their short names.
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
# Shown by name, not expanded (Int64 is Annotated[int, Field(ge=..., le=...)]).
autodoc_type_aliases = {
    "Int64": "timer_sdk.models.Int64",
    "Scheme": "timer_sdk.wire.address.Scheme",
    "EchoListener": "timer_sdk.timer.EchoListener",
}
python_use_unqualified_type_names = True
add_module_names = False

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

html_theme = "furo"
html_title = f"timer-sdk {release}"
html_static_path: list[str] = []
templates_path = ["_templates"]
html_show_sourcelink = False
html_copy_source = False
html_permalinks_icon = "#"
html_show_sphinx = False  # its footer links to sites outside; the site loads nothing from them
