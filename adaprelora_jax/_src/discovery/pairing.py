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
"""Pairing rules: which leaves of a parameter tree are LoRA factors.

A pairing function looks at one leaf (its path as a tuple of strings and the
array) and says whether it is a LoRA factor, which pair it belongs to and
whether it is ``a`` or ``b`` (a :class:`LoRARole`). Presets: flax nnx
``lora_a``/``lora_b`` siblings and qwix ``<weight>_lora_a``/``<weight>_lora_b``
siblings (``"nnx"``, N-D factors included), or peft ``lora_A: (r, d_in)``,
``lora_B: (d_out, r)`` (``"peft"``, marked ``transposed``).
:func:`adaprelora_jax.pairing.annotate_pairing` adds per-pair dimension
numbers and LoRA scales to any pairing. :func:`adaprelora_jax.plan_pairs`
applies a pairing to a whole tree.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
  from adaprelora_jax._src.discovery.dimension_numbers import LoRADimensionNumbers

Role = Literal["a", "b", "row_stats", "col_stats"]
# Where a pair's gradient statistics come from (docs/design.md §5).
Statistics = Literal["auto", "exact", "tangent", "surrogate"]
ROLES: tuple[str, ...] = ("a", "b", "row_stats", "col_stats")

# Names of the exact-statistics probe leaves written by
# :class:`adaprelora_jax.nn.LoRA` next to ``lora_a``/``lora_b``.
ROW_STATS_NAME = "grad_sq_rows"
COL_STATS_NAME = "grad_sq_cols"


class LoRARole(NamedTuple):
  """What a pairing function says about one leaf.

  Attributes:
    pair: identifier shared by all leaves of one LoRA pair.
    role: ``"a"`` (``lora_a``), ``"b"`` (``lora_b``), or ``"row_stats"`` /
      ``"col_stats"`` for exact gradient-statistics leaves.
    transposed: the factor is stored in PyTorch layout (``lora_A: (r, d_in)``,
      ``lora_B: (d_out, r)``, with optional shared leading layer axes).
    layout: any hashable describing how the leaf is laid out across devices
      (e.g. its sharding, see
      :func:`adaprelora_jax.sharding.sharded_pairing`). Same-shaped pairs are
      stacked and updated together only if their leaves' layouts agree:
      stacking differently sharded factors would make XLA reshard them.
    dimension_numbers: the pair's axes (:class:`LoRADimensionNumbers`);
      None: inferred from the factor shapes
      (:func:`infer_dimension_numbers`). May be given on either factor's
      role; if given on both they must agree.
    scale: the pair's LoRA scale ``s`` (the model computes
      ``x·(s·a·b)``, e.g. qwix's ``alpha / rank``); None: 1. Optimizers that
      take a ``lora_scale`` multiply it by this (docs/design.md §9).
    sharded_axes: axes of this factor that are sharded across devices
      (:func:`adaprelora_jax.sharding.sharded_pairing` fills them in). When
      several axes form ``d_in`` (``d_out``) and the dimension numbers do not
      order them, sharded ones are flattened first: only a major axis keeps
      its sharding through the reshape (docs/design.md §9).
  """

  pair: str
  role: Role
  transposed: bool = False
  layout: Hashable = None
  dimension_numbers: LoRADimensionNumbers | None = None
  scale: float | None = None
  sharded_axes: tuple[int, ...] = ()


PairingFn = Callable[[tuple[str, ...], Any], LoRARole | None]
Pairing = Literal["nnx", "peft"] | PairingFn


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A jax key path as a tuple of strings.

  The trailing ``value`` attribute that flax nnx ``Variable`` nodes add is
  dropped, so ``nnx.State`` and plain dicts give the same names.
  """
  names = tuple(_key_name(key) for key in path)
  if path and type(path[-1]).__name__ == "GetAttrKey" and names[-1] == "value":
    names = names[:-1]
  return names


def format_path(names: Sequence[str]) -> str:
  return "/".join(names) if names else "<root>"


_NNX_ROLES: dict[str, Role] = {
  "lora_a": "a",
  "lora_b": "b",
  ROW_STATS_NAME: "row_stats",
  COL_STATS_NAME: "col_stats",
}
# qwix (``qwix.LoraProvider``) names the factors of a weight ``w`` (``kernel``
# for ``nnx.Linear``) ``w_lora_a`` / ``w_lora_b``, next to ``w``.
# :class:`adaprelora_jax.qwix.LoraProvider` adds the exact-statistics probes
# ``w_grad_sq_rows`` / ``w_grad_sq_cols`` beside them.
_QWIX_SUFFIXES: tuple[tuple[str, Role], ...] = (
  ("_lora_a", "a"),
  ("_lora_b", "b"),
  ("_" + ROW_STATS_NAME, "row_stats"),
  ("_" + COL_STATS_NAME, "col_stats"),
)


def nnx_pairing(path: tuple[str, ...], leaf: Any) -> LoRARole | None:
  """Pairs flax ``nnx.LoRA`` and qwix LoRA leaves.

  flax: siblings named ``lora_a`` and ``lora_b`` (pair: their parent's path),
  and the exact-statistics leaves ``grad_sq_rows`` and ``grad_sq_cols`` of
  :class:`adaprelora_jax.nn.LoRA`. qwix (``qwix.apply_lora_to_model``):
  siblings ``<weight>_lora_a`` and ``<weight>_lora_b`` (pair: the weight's
  path, e.g. ``blocks/0/attn/q_einsum/w``), whose factors may be N-D
  (:func:`infer_dimension_numbers`), and the exact-statistics probes
  ``<weight>_grad_sq_rows`` / ``<weight>_grad_sq_cols`` of
  :class:`adaprelora_jax.qwix.LoraProvider`.
  """
  del leaf
  if not path:
    return None
  name = path[-1]
  role = _NNX_ROLES.get(name)
  if role is not None:
    return LoRARole(format_path(path[:-1]), role)
  for suffix, role in _QWIX_SUFFIXES:
    if name.endswith(suffix) and len(name) > len(suffix):
      return LoRARole(format_path((*path[:-1], name[: -len(suffix)])), role)
  return None


def peft_pairing(path: tuple[str, ...], leaf: Any) -> LoRARole | None:
  """Pairs peft-style ``lora_A``/``lora_B`` leaves stored in PyTorch layout.

  Works on nested trees and on flat state dicts with dotted keys, e.g.
  ``"model.layers.0.q_proj.lora_A.default.weight"`` pairs with the same key
  with ``lora_B``. ``lora_A`` is (r, d_in) and ``lora_B`` is (d_out, r).
  """
  del leaf
  tokens = [token for name in path for token in name.split(".")]
  markers: tuple[tuple[str, Role], ...] = (("lora_A", "a"), ("lora_B", "b"))
  for marker, role in markers:
    if marker in tokens:
      index = tokens.index(marker)
      pair = ".".join(tokens[:index] + ["lora_*"] + tokens[index + 1 :])
      return LoRARole(pair, role, transposed=True)
  return None


_PRESETS: dict[str, PairingFn] = {"nnx": nnx_pairing, "peft": peft_pairing}


def resolve_pairing(pairing: Pairing) -> PairingFn:
  """Turns a preset name or a callable into a pairing function."""
  if isinstance(pairing, str):
    if pairing not in _PRESETS:
      raise ValueError(
        f"Unknown pairing preset {pairing!r}; use one of {sorted(_PRESETS)} "
        "or a callable (path, leaf) -> LoRARole | None."
      )
    return _PRESETS[pairing]
  if not callable(pairing):
    raise TypeError(f"pairing must be a preset name or a callable, got {pairing!r}.")
  return pairing
