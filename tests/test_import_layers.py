"""The package's layers: imports run one way and shallow.

Read from the source (module-level imports; those under ``if
TYPE_CHECKING:`` are annotations only and do not run), so a new import that
breaks a layer or deepens the stack fails here rather than in a review.
"""

import ast
import functools
import pathlib

import pytest

import adaprelora_jax

PACKAGE = pathlib.Path(adaprelora_jax.__file__).parent


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


@functools.cache
def imported(name: str) -> frozenset[str]:
  """Everything ``name`` imports when it is imported: ``a.b`` for ``import
  a.b`` and for ``from a import b``."""
  found = set()
  for node in ast.parse(MODULES[name].read_text()).body:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return frozenset(found)


def imports(name: str) -> frozenset[str]:
  """The package modules ``name`` imports (``from a import b`` names module
  ``a`` unless ``a.b`` is a module itself)."""
  modules = {full if full in MODULES else full.rpartition(".")[0] for full in imported(name)}
  return frozenset(m for m in modules if m in MODULES and m not in (name, "adaprelora_jax"))


@functools.cache
def longest_chain(name: str, seen: tuple[str, ...] = ()) -> tuple[str, ...]:
  """The longest import chain from ``name`` (``name`` included)."""
  assert name not in seen, "import cycle: " + " -> ".join((*seen, name))
  return max(
    ((name, *longest_chain(m, (*seen, name))) for m in imports(name)), key=len, default=(name,)
  )


def _in(name: str, layer: str) -> bool:
  return name == layer or name.startswith(layer + ".")


def test_the_import_graph_is_read():
  assert "adaprelora_jax._src.engine.pairwise" in MODULES
  assert "adaprelora_jax._src.discovery.plan" in imports("adaprelora_jax._src.engine.pairwise")


@pytest.mark.parametrize(
  ("name", "most"),
  [
    # The optimizer's whole update, file by file (docs/design.md §10).
    ("adaprelora_jax.transform", 5),
    ("adaprelora_jax.tracking", 5),
    # Their aliases chain track_step_metrics, a public transform of its own,
    # one level above the cores as optax's alias.py is above transform.py.
    ("adaprelora_jax.baselines.lora_plus", 6),
    ("adaprelora_jax.baselines.lora_pro", 6),
    ("adaprelora_jax.baselines.lora_rite", 6),
    ("adaprelora_jax.baselines.riemannian", 6),
  ],
)
def test_import_stack_depth(name, most):
  chain = longest_chain(name)
  assert len(chain) <= most, " -> ".join(chain)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _in(m, "adaprelora_jax._src")))
def test_internals_import_only_lower_layers(name):
  allowed = {
    "adaprelora_jax._src.discovery": ("adaprelora_jax._src.discovery",),
    "adaprelora_jax._src.maths": ("adaprelora_jax._src.maths",),
    "adaprelora_jax._src.engine": (
      "adaprelora_jax._src.engine",
      "adaprelora_jax._src.discovery",
      "adaprelora_jax._src.maths",
    ),
  }
  layer = next((layer for layer in allowed if _in(name, layer)), None)
  for imported in imports(name):
    assert imported == "adaprelora_jax._src.validation" or (
      layer is not None and any(_in(imported, lower) for lower in allowed[layer])
    ), f"{name} imports {imported}"
  assert len(longest_chain(name)) <= 4, " -> ".join(longest_chain(name))


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _in(m, "adaprelora_jax._src")))
def test_internals_do_not_import_flax(name):
  assert "flax" not in {full.split(".")[0] for full in imported(name)}
