"""Sphinx configuration: the documentation site of lightning_flatness (build: scripts/build_docs.sh).

Sphinx rather than MkDocs because the docstrings are written for it: they use reST roles
(:class:, :func:, :mod:), ``.. math::`` blocks and Google-style sections, which autodoc + napoleon
render as they are, so the docstrings stay the single source of the API reference. The existing
markdown pages (design notes, reproduction results) are read by myst-parser.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from lightning_flatness import __version__  # noqa: E402

project = "lightning_flatness"
author = "lightning_flatness contributors"
copyright = "2026, lightning_flatness contributors"  # noqa: A001
release = version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}
# Optional backends are imported lazily inside functions; nothing needs mocking at import time.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: no duplicate entries for NamedTuple fields

html_theme = "furo"
html_title = f"lightning_flatness {version}"
html_static_path = ["_static"]
