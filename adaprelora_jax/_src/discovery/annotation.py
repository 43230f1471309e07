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
"""A pairing combinator: per-pair dimension numbers and LoRA scales.

Kept apart from the pairing rules (:mod:`adaprelora_jax._src.discovery.pairing`)
because it is the one part of them that needs
:class:`~adaprelora_jax.LoRADimensionNumbers` at run time; the rules stay a
leaf of the import graph, below the pair checks and the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adaprelora_jax._src.discovery.dimension_numbers import LoRADimensionNumbers
from adaprelora_jax._src.discovery.pairing import LoRARole
from adaprelora_jax._src.discovery.pairing import Pairing
from adaprelora_jax._src.discovery.pairing import PairingFn
from adaprelora_jax._src.discovery.pairing import resolve_pairing


def annotate_pairing(
  pairing: Pairing = "nnx",
  *,
  dimension_numbers: (
    LoRADimensionNumbers
    | dict[str, LoRADimensionNumbers]
    | Callable[[str], LoRADimensionNumbers | None]
    | None
  ) = None,
  scale: float | dict[str, float] | Callable[[str], float | None] | None = None,
) -> PairingFn:
  """A pairing that declares dimension numbers and/or LoRA scales per pair.

  Example (a MaxText-style scanned model, layers at axis 1, qwix
  ``alpha=16, rank=8``)::

    pairing = adaprelora_jax.pairing.annotate_pairing(
        dimension_numbers=LoRADimensionNumbers(a_batch_axes=(1,), b_batch_axes=(1,)),
        scale=16 / 8)
    tx = adaprelora_jax.adaprelora(1e-3, pairing=pairing)

  Args:
    pairing: how the pairs are found (preset name or callable).
    dimension_numbers: for every pair (a :class:`LoRADimensionNumbers`), by
      pair name (a dict; pairs not in it are inferred) or a callable
      ``pair name -> LoRADimensionNumbers | None``.
    scale: the pairs' LoRA scale (:attr:`adaprelora_jax.pairing.LoRARole.scale`), given the same
      ways.

  Returns:
    A pairing function (list it in ``static_args`` of
    ``optax.inject_hyperparams``).
  """
  pairing_fn = resolve_pairing(pairing)

  def lookup(spec, name):
    if spec is None or isinstance(spec, (LoRADimensionNumbers, int, float)):
      return spec
    if isinstance(spec, dict):
      return spec.get(name)
    return spec(name)

  def annotated(path: tuple[str, ...], leaf: Any) -> LoRARole | None:
    found = pairing_fn(path, leaf)
    if found is None:
      return None
    found = LoRARole(*found)
    if found.role not in ("a", "b"):
      return found
    updates = {}
    declared = lookup(dimension_numbers, found.pair)
    if declared is not None:
      updates["dimension_numbers"] = declared
    pair_scale = lookup(scale, found.pair)
    if pair_scale is not None:
      updates["scale"] = pair_scale
    return found._replace(**updates)

  return annotated
