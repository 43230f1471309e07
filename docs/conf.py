"""Sphinx configuration of the adaprelora_jax documentation (optax's layout)."""

import adaprelora_jax

project = "adaprelora_jax"
author = "The adaprelora_jax Authors"
copyright = "2026, The adaprelora_jax Authors"  # noqa: A001  (Sphinx's name)
release = adaprelora_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.doctest",
  "sphinx.ext.intersphinx",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "myst_nb",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# The notebook is executed by tests/test_notebooks.py and committed with its
# outputs; the site renders it as committed.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# Links to repository files (tests, experiments) are not documents of the site.
suppress_warnings = []

# Names every example of the guide may use without importing them.
doctest_global_setup = """
import jax
import jax.numpy as jnp
import optax
from flax import nnx
import adaprelora_jax as ap
"""

autosummary_generate = True
autodoc_typehints = "none"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

intersphinx_mapping = {}

html_theme = "sphinx_book_theme"
html_title = "adaprelora_jax"
html_theme_options = {"show_toc_level": 2}
