"""Sphinx configuration for the flask-koala docs (MyST Markdown pages, API from docstrings)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask_koala import __version__  # noqa: E402

project = "flask-koala"
author = "flask-koala contributors"
copyright = "2026, flask-koala contributors"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
# Notes other branches leave for the integrator to fold into these pages; not pages.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No intersphinx: the build must not need the network.
nitpicky = False

html_theme = "furo"
html_title = f"flask-koala {release}"
