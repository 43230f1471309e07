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
"""Reading an optimizer state: second moments, skipped steps, step metrics."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.discovery import plan as plan_lib
from adaprelora_jax._src.engine import nnx_labels
from adaprelora_jax._src.maths import metrics as metrics_lib
from adaprelora_jax.transform import STORAGE
from adaprelora_jax.transform import ScaleByAdaPreLoRAState


def _nodes_of_type(state: Any, node_type: type) -> list[Any]:
  """Every node of ``node_type`` inside an optimizer state, in tree order."""
  is_node = lambda x: isinstance(x, node_type)  # noqa: E731
  return [node for node in jax.tree.leaves(state, is_leaf=is_node) if is_node(node)]


def _adaprelora_states(state: Any) -> list[ScaleByAdaPreLoRAState]:
  """Every :class:`ScaleByAdaPreLoRAState` inside an optimizer state."""
  found = _nodes_of_type(state, ScaleByAdaPreLoRAState)
  if not found:
    raise ValueError("No ScaleByAdaPreLoRAState found in the optimizer state.")
  return found


def second_moments(
  state: Any, params: Any, pairing: pairing_lib.Pairing = "nnx"
) -> tuple[Any, Any]:
  """The factored second moments of every LoRA pair, as trees like the params.

  Example::

    >>> import jax.numpy as jnp
    >>> from adaprelora_jax import adaprelora, second_moments
    >>> params = {"q": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}}
    >>> tx = adaprelora(1e-2)
    >>> rows, cols = second_moments(tx.init(params), params)
    >>> rows["q"]["lora_a"].shape, cols["q"]["lora_b"].shape
    ((8,), (4,))

  Args:
    state: an optimizer state containing one :class:`ScaleByAdaPreLoRAState`
      (anywhere, e.g. inside ``optax.chain`` or ``inject_hyperparams``).
    params: the params the optimizer was initialized with.
    pairing: the pairing used by the optimizer.

  Returns:
    ``(rows, cols)``: trees like ``params`` with each pair's row second
    moment (..., d_in) at its ``lora_a``, column second moment (..., d_out)
    at its ``lora_b``, and ``optax.MaskedNode()`` elsewhere.

  Raises:
    ValueError: if the state holds no or several AdaPreLoRA states, or was
      built for other params.
  """
  found = _adaprelora_states(state)
  if len(found) > 1:
    raise ValueError(
      f"The optimizer state holds {len(found)} ScaleByAdaPreLoRAStates; pass "
      "the one whose second moments you want."
    )
  plan = plan_lib.plan_pairs(params, pairing)
  pairs = found[0].pairs
  return tuple(
    slot.unstack(plan, [nnx_labels.unwrap(array) for array in entry])
    for slot, entry in (
      (STORAGE.row_second_moment, pairs.row_second_moment),
      (STORAGE.col_second_moment, pairs.col_second_moment),
    )
  )


def nonfinite_report(
  state: Any, params: Any, pairing: pairing_lib.Pairing = "nnx"
) -> dict[str, int]:
  """Host-side report of skipped (non-finite) steps per LoRA pair.

  Args:
    state: an optimizer state containing a :class:`ScaleByAdaPreLoRAState`
      (anywhere, e.g. inside ``optax.chain`` or ``inject_hyperparams``).
    params: the params the optimizer was initialized with.
    pairing: the pairing used by the optimizer.

  Returns:
    ``{path of lora_a: number of skipped steps}`` for pairs with skips (summed
    over leading layer axes).
  """
  plan = plan_lib.plan_pairs(params, pairing)
  rows = plan.pair_rows()
  report: dict[str, int] = {}
  for inner in _adaprelora_states(state):
    counts = np.asarray(inner.pairs.nonfinite_count)
    if counts.shape != (plan.num_rows,):
      raise ValueError(
        f"nonfinite_count has shape {counts.shape} but the params have "
        f"{plan.num_rows} LoRA pairs (counting stacked layers): pass the "
        "params the optimizer was initialized with."
      )
    for pair in plan.pairs:
      skipped = int(counts[rows[pair.a_index]].sum())
      if skipped:
        report[pair.a_path] = report.get(pair.a_path, 0) + skipped
  return report


def step_metrics(state: Any) -> dict[str, jax.Array]:
  """The last update's metrics, as a flat dict a trainer can log.

  Reads every :class:`adaprelora_jax.StepMetrics` in an optimizer
  state: through ``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps`` (the last completed update) and ``nnx.Optimizer``'s
  ``opt_state``. Works inside ``jax.jit``; the values are device arrays.

  Example::

    >>> import jax.numpy as jnp
    >>> from adaprelora_jax import adaprelora, step_metrics
    >>> params = {"q": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}}
    >>> tx = adaprelora(1e-2, metrics=True)
    >>> grads = {"q": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> float(step_metrics(state)["clip_factor/min"]) <= 1.0
    True

  Args:
    state: an optimizer state holding one or more ``StepMetrics`` (built with
      ``metrics=True``, or with :func:`adaprelora_jax.track_step_metrics` in
      the chain).

  Returns:
    ``{name: scalar}``, names as in :mod:`adaprelora_jax._src.maths.metrics`; with
    several ``StepMetrics`` in the state, each name is prefixed by its
    position, ``"0/"``, ``"1/"``, ... in the state's tree order.

  Raises:
    ValueError: if the state holds none.
  """
  found = _nodes_of_type(state, metrics_lib.StepMetrics)
  if not found:
    raise ValueError(
      "The optimizer state holds no step metrics: build the optimizer with "
      "metrics=True, or put adaprelora_jax.track_step_metrics() in its chain."
    )
  values = [{k: nnx_labels.unwrap(v) for k, v in entry.values.items()} for entry in found]
  if len(values) == 1:
    return values[0]
  return {f"{index}/{k}": v for index, entry in enumerate(values) for k, v in entry.items()}
