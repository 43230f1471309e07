# Copyright 2026 The adaprelora_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The version of the optimizer-state layout, saved with every state.

Every state of this package's transforms carries a ``layout_version`` leaf
(an int32 scalar, :data:`STATE_LAYOUT_VERSION`), so a checkpoint says which
layout it holds. A checkpoint of another layout does not fit today's state
tree; :func:`check_checkpoint_layout` reads only the saved versions and
raises a :class:`StateLayoutError` that names both layouts, before a restore
would fail on the tree structure (CHANGELOG.md lists the layouts).

  >>> import jax.numpy as jnp
  >>> import adaprelora_jax as ap
  >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
  >>> state = ap.scale_by_adaprelora().init(params)
  >>> int(state.bookkeeping.layout_version) == ap.STATE_LAYOUT_VERSION
  True
  >>> ap.check_state_layout(state, state)  # the same layout: no error
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Layout 1: second moments per factor; 2: stacked per group (0.1.0);
# 3: the same with this version leaf; 4: no non_lora field in the cores, the
# aliases' other leaves in an optax.partition (CHANGELOG.md, "State layout").
STATE_LAYOUT_VERSION = 4
# The newest layout that was saved without a version leaf.
_LAST_UNVERSIONED_LAYOUT = 2
_FIELD = "layout_version"


class StateLayoutError(ValueError):
  """A saved optimizer state has another layout than this release's."""


def version_leaf() -> jax.Array:
  """The ``layout_version`` entry of a new state."""
  return jnp.asarray(STATE_LAYOUT_VERSION, jnp.int32)


def _is_version_path(path: tuple[Any, ...]) -> bool:
  # A state field (GetAttrKey) in memory, a dict key once saved; an nnx
  # Variable may add a trailing ``value`` key.
  names = [getattr(key, "name", getattr(key, "key", None)) for key in path]
  return bool(names) and (names[-1] == _FIELD or names[-2:] == [_FIELD, "value"])


def _versions(tree: Any) -> dict[str, Any]:
  return {
    jax.tree_util.keystr(path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if _is_version_path(path)
  }


def check_state_layout(saved: Any, target: Any, *, source: str = "the saved state") -> None:
  """Raises unless ``saved`` has the state layout of ``target``.

  Args:
    saved: a saved optimizer state as read back without a target (nested
      dicts and lists of arrays, e.g. orbax's restore without ``item``), or
      a state tree.
    target: the state to restore into, e.g. ``optimizer.init(params)``;
      states of other libraries (no ``layout_version``) are not checked.
    source: how the error names ``saved``.

  Raises:
    StateLayoutError: if ``target`` holds a state of this package and
      ``saved`` holds no layout version (layout 2 or older) or another one;
      the message names both layouts.
  """
  if not _versions(target):
    return
  saved_versions = {path: int(np.asarray(value)) for path, value in _versions(saved).items()}
  found = sorted(set(saved_versions.values()))
  if found == [STATE_LAYOUT_VERSION]:
    return
  if not found:
    held = (
      f"an optimizer state without a layout version, i.e. state layout "
      f"{_LAST_UNVERSIONED_LAYOUT} or older"
    )
  else:
    held = "optimizer state layout " + ", ".join(
      f"{version} (at {path})"
      for path, version in sorted(saved_versions.items())
      if version != STATE_LAYOUT_VERSION
    )
  raise StateLayoutError(
    f"{source} holds {held}; this adaprelora_jax reads state layout "
    f"{STATE_LAYOUT_VERSION}. CHANGELOG.md lists the layouts under 'State layout'. "
    "Restore it with the release that saved it, or start the optimizer from "
    "optimizer.init(params) and keep only the parameters."
  )


def check_checkpoint_layout(directory: str | os.PathLike[str], target: Any) -> None:
  """Raises unless the orbax checkpoint at ``directory`` fits ``target``'s layout.

  Reads only the checkpoint's tree metadata and its ``layout_version``
  entries (no other array is loaded), so it can run before the restore::

    ap.check_checkpoint_layout(path, abstract_state)
    state = ocp.StandardCheckpointer().restore(path, abstract_state)

  Args:
    directory: an orbax PyTree checkpoint of an optimizer state (what
      ``ocp.StandardCheckpointer().save`` writes; for a
      ``CheckpointManager``, the item's directory ``<root>/<step>/<item>``).
    target: the state to restore into (arrays or ``jax.ShapeDtypeStruct``).

  Raises:
    StateLayoutError: as :func:`check_state_layout`.
  """
  # orbax is imported here: importing it costs more than the rest of the
  # package, and only checkpoint users need it.
  import orbax.checkpoint as ocp

  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(directory).item_metadata.tree

  # Every other leaf is a placeholder: orbax leaves it unread. The versions
  # are read as NumPy scalars, whatever devices the state was saved from.
  def only_versions(value: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
      lambda path, _: value if _is_version_path(path) else ocp.PLACEHOLDER, metadata
    )

  saved = checkpointer.restore(
    directory,
    args=ocp.args.PyTreeRestore(
      item=only_versions(np.zeros((), np.int32)),
      restore_args=only_versions(ocp.RestoreArgs(restore_type=np.ndarray)),
    ),
  )
  check_state_layout(saved, target, source=f"the checkpoint at {os.fspath(directory)}")
