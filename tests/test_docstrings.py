"""The docstring examples of the package run and show what they print."""

import doctest
import importlib
import pkgutil

import pytest

import adaprelora_jax

MODULES = sorted(
  name for _, name, _ in pkgutil.walk_packages(adaprelora_jax.__path__, "adaprelora_jax.")
)
# Modules whose public entry points carry examples: guards against passing
# because no example was found.
WITH_EXAMPLES = {
  "adaprelora_jax.transform",
  "adaprelora_jax.nn",
  "adaprelora_jax._src.maths.closed_form",
  "adaprelora_jax.reports",
  "adaprelora_jax.qwix",
}


# Modules of optional extras: checked where their dependency is installed (the
# default suite installs it; the version-floor step of .ci/run does not).
OPTIONAL_DEPENDENCY = {
  "adaprelora_jax.qwix": "qwix",
  "adaprelora_jax.tunix_cli": "tunix",
  "adaprelora_jax.tunix_hooks": "tunix",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  if name in OPTIONAL_DEPENDENCY:
    pytest.importorskip(OPTIONAL_DEPENDENCY[name])
  result = doctest.testmod(
    importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  )
  assert result.failed == 0
  assert result.attempted > 0 or name not in WITH_EXAMPLES
