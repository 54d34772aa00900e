"""Sphinx configuration of the optax_sphere documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (``-W``: warnings are errors).
The API pages are generated from ``__all__`` at build time (``_ext/apigen.py``) and the
results tables from the JSON files the scripts write (``_ext/results_tables.py``).
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)  # document this checkout of the package, not an installed copy
sys.path.insert(0, os.path.join(DOCS, "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import optax_sphere  # noqa: E402

project = "optax_sphere"
author = "the optax_sphere authors"
copyright = "2026, the optax_sphere authors"
release = optax_sphere.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "apigen",
    "results_tables",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "README.md", "results/*"]

# MyST: $...$ / $$...$$ math, ::: fences, definition lists, anchors on headings.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc / autosummary / napoleon
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False  # the API pages are written by apigen from __all__
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = False

# Broken cross-references inside the package fail the build; names of other libraries are
# not resolvable offline (no intersphinx), so they are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|numpy|np|jnp|chex|flax|typing|collections|types)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Sequence|Literal|NamedTuple|Union|Optional|PyTree)"),
    (r"py:.*", r"(int|float|str|bool|tuple|list|dict|None|object|type|Ellipsis)"),
    (r"py:.*", r"(Hyper|GroupsLike|LeafSpec|Transport|Op|ArrayLike|Array|Shape|DType)"),
    (r"py:.*", r"(_utils|optax_sphere\._utils)\..*"),
    (r"py:.*", r"(argparse|pathlib)(\..*)?"),
    (r"py:.*", r"(dict|list|tuple)\[.*"),  # a generic in a string annotation, split by Sphinx
]

html_theme = "sphinx_book_theme"
html_title = f"optax_sphere {release}"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
# MathJax 3 is loaded from its CDN by default; pages still render their text offline.
mathjax3_config = {"tex": {"macros": {"R": r"\mathbb{R}"}}}

# A local MathJax (for example from the `mathjax` npm package) for offline viewing:
# OPTAX_SPHERE_MATHJAX=/path/to/tex-mml-chtml.js python -m sphinx ...
if os.environ.get("OPTAX_SPHERE_MATHJAX"):
    mathjax_path = "file://" + os.path.abspath(os.environ["OPTAX_SPHERE_MATHJAX"])
