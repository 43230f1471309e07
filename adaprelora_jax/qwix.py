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
"""qwix LoRA that hands AdaPreLoRA the exact statistics of the weight gradient.

:class:`LoraProvider` is ``qwix.LoraProvider`` (same arguments, same LoRA
parameters and outputs) used with ``qwix.apply_lora_to_model`` unchanged, as
Tunix and MaxText do. Every LoRA'd ``dot_general`` (``nnx.Linear``, batched
dot_general) and two-operand ``einsum`` (Gemma's N-D attention einsums, the
MoE einsum) also gets two zero-valued probe leaves beside
``<weight>_lora_a``/``<weight>_lora_b``: ``<weight>_grad_sq_rows``, shaped
like ``lora_a`` with the rank axis of size 1, and ``<weight>_grad_sq_cols``,
shaped like ``lora_b`` with the rank axis of size 1. Their *gradient* is the
row and column means of ``G²`` in the pair's flattened ``(d_in, d_out)``
layout (``docs/design.md`` §9), computed in the backward pass by a custom VJP
from the op's input and output cotangent, forming ``G`` only when that is
cheaper than the token Grams. Being factor-shaped, the probes are stacked,
scanned and sharded exactly like the factors, so a layer axis may sit
anywhere. The default pairing of :func:`adaprelora_jax.adaprelora` picks
them up (``statistics="auto"``) with no glue.

What the statistics are:

* ``G`` is the gradient of the map the factors compute, ``a·b``: for qwix's
  ``W = W0 + s·a·b`` (``s = alpha / rank``) that is ``s·∂L/∂W``, the object
  the factor gradients are derivatives of. With ``lora_scale=s`` the
  optimizer divides the factor gradients by ``s`` and these statistics by
  ``s²``, so it works with ``∂L/∂W`` itself, as with tangent statistics.
* ``G`` is taken at the op's own input: with LoRA dropout it is the gradient
  of a dense ``ΔW`` added to the (frozen, possibly quantized) weight, which
  sees the input before dropout, as a backward hook on ``W`` does.
* Under ``optax.MultiSteps`` the optimizer sees the probes' mean over the
  micro-batches, which is the mean of the micro-batch statistics, not the
  statistics of the accumulated gradient.
* Statistics are float32 or wider whatever the model's dtype.
* The probes are gradient leaves: transforms chained before the optimizer
  (``optax.clip_by_global_norm``) and Tunix's logged ``grad_norm`` see them
  too; mask them out of a clip (docs/usage.md).

``conv_general_dilated`` LoRA (qwix supports it) gets no probes: such pairs
fall back to the tangent estimate under ``statistics="auto"``.

This module uses qwix internals (the current LoRA rule, the weight lookup
and parameter creation of ``qwix._src``); it is tested against the qwix
version pinned by the package's extras.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from qwix._src.core import einsum_info
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from adaprelora_jax._src import validation
from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.maths.weight_statistics import EinsumWeightLayout
from adaprelora_jax._src.maths.weight_statistics import check_einsum_weight_layout
from adaprelora_jax._src.maths.weight_statistics import einsum_weight_statistics
from adaprelora_jax.nn import GradientStatistic

__all__ = ["LoraProvider", "apply_lora_to_model"]

ROW_STATS_SUFFIX = "_" + pairing_lib.ROW_STATS_NAME
COL_STATS_SUFFIX = "_" + pairing_lib.COL_STATS_NAME

# Re-exported so that a recipe needs only this module.
apply_lora_to_model = qwix.apply_lora_to_model


class StatisticsSpec(NamedTuple):
  """What one op's probes report (static, hashable).

  Attributes:
    layout: how the weight enters the op (:class:`EinsumWeightLayout`).
    scale: the LoRA scale ``s = alpha / rank``.
    groups: token groups of per-shard statistics (1: global statistics).
    group_axes: the mesh axes the groups lie on, or None.
  """

  layout: EinsumWeightLayout
  scale: float
  groups: int = 1
  group_axes: tuple[str, ...] | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def report_statistics(
  outputs: jax.Array,
  inputs: jax.Array,
  rows_probe: jax.Array,
  cols_probe: jax.Array,
  spec: StatisticsSpec,
) -> jax.Array:
  """Identity in ``outputs``; the probes' cotangents are ``s²``·the G² statistics.

  Args:
    outputs: the op's output ``y = einsum(x, W)`` (LoRA included).
    inputs: the op's input ``x``; its cotangent from here is zero.
    rows_probe: zero leaf shaped like ``lora_a`` with a rank axis of 1.
    cols_probe: zero leaf shaped like ``lora_b`` with a rank axis of 1.
    spec: the op's :class:`StatisticsSpec`.

  Returns:
    ``outputs``.
  """
  del inputs, rows_probe, cols_probe, spec
  return outputs


def _report_statistics_fwd(outputs, inputs, rows_probe, cols_probe, spec):
  del spec
  return outputs, (inputs, rows_probe, cols_probe)


def _report_statistics_bwd(spec, residuals, output_grads):
  inputs, rows_probe, cols_probe = residuals
  rows, cols = einsum_weight_statistics(
    inputs, output_grads, spec.layout, groups=spec.groups, group_axes=spec.group_axes
  )
  # Statistics of s·∂L/∂W, the gradient of the product a·b (module docstring).
  squared_scale = spec.scale * spec.scale
  return (
    output_grads,
    jnp.zeros_like(inputs),
    (squared_scale * rows).reshape(rows_probe.shape).astype(rows_probe.dtype),
    (squared_scale * cols).reshape(cols_probe.shape).astype(cols_probe.dtype),
  )


report_statistics.defvjp(_report_statistics_fwd, _report_statistics_bwd)


def dot_general_layout(
  lhs_ndim: int, rhs_ndim: int, dimension_numbers: jax.lax.DotDimensionNumbers
) -> EinsumWeightLayout:
  """The :class:`EinsumWeightLayout` of qwix's LoRA pair for a ``dot_general``.

  qwix lays the factors out as ``a (*batch, prod(contracting), r)`` and
  ``b (*batch, r, prod(free))``: the weight's batch dimensions are the pair's
  batch axes, its contracting dimensions (in ``dimension_numbers`` order)
  form ``d_in`` and its free dimensions (ascending) ``d_out``.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
  lhs = [next(letters) for _ in range(lhs_ndim)]
  rhs_free = [axis for axis in range(rhs_ndim) if axis not in (*rhs_batch, *rhs_contract)]
  free_chars = "".join(next(letters) for _ in rhs_free)
  lhs_free = [axis for axis in range(lhs_ndim) if axis not in (*lhs_batch, *lhs_contract)]
  batch_chars = "".join(lhs[axis] for axis in lhs_batch)
  return EinsumWeightLayout(
    inputs="".join(lhs),
    outputs=batch_chars + "".join(lhs[axis] for axis in lhs_free) + free_chars,
    lead=batch_chars,
    in_chars="".join(lhs[axis] for axis in lhs_contract),
    out_chars=free_chars,
  )


def einsum_layout(einsum_str: str, lhs_ndim: int, rhs_ndim: int) -> EinsumWeightLayout:
  """The :class:`EinsumWeightLayout` of qwix's LoRA pair for ``einsum(x, W)``.

  qwix puts the weight's axes shared with ``x`` (batch or contracting) in
  ``a`` and the others in ``b``, each in the weight's axis order.
  """
  info = einsum_info.EinsumInfo.parse(einsum_str, ndims=(lhs_ndim, rhs_ndim))
  return EinsumWeightLayout(
    inputs=info.lhs,
    outputs=info.out,
    lead="",
    in_chars="".join(c for c in info.rhs if c in info.lhs),
    out_chars="".join(c for c in info.rhs if c not in info.lhs),
  )


def _factor(module: Any, name: str) -> Any:
  """The boxed LoRA factor ``name`` of the current (nnx or linen) module."""
  if isinstance(module, nnx.Module):
    return getattr(module, name)
  return module.get_variable("params", name)


def _probe_init(factor: Any, shape: tuple[int, ...]) -> Any:
  """A float32 zero probe of ``shape`` with ``factor``'s sharding and metadata.

  ``shape`` differs from the factor's only in its rank axis (size 1, never
  sharded by qwix), so the factor's partition spec fits it.
  """
  value = jnp.zeros(shape, jnp.float32)
  sharding = getattr(flax_util.unbox(factor), "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    value = jax.device_put(value, sharding)
  if isinstance(factor, nnx.Variable):
    return nnx.VariableMetadata(value, metadata=factor.get_metadata())
  return flax_util.update_boxed(factor, value=value)


class LoraProvider(qwix.LoraProvider):
  """``qwix.LoraProvider`` whose LoRA ops report exact Adafactor statistics.

  Same arguments as ``qwix.LoraProvider`` (``module_path``, ``rank``,
  ``alpha``, ``dropout``, ``weight_qtype``, ... or a list of
  ``qwix.LoraRule``); the model gets the same LoRA factors and computes the
  same outputs, plus the probe leaves described in the module docstring.

  Args:
    rules: a list of ``qwix.LoraRule``, or None to build one from ``kwargs``.
    statistics_batch_axes: None (default): the statistics of the gradient of
      the whole batch. Under data parallelism over the batch, forming them
      needs an all-reduce of a weight-sized ``G`` (or of token Grams) per
      adapted op (docs/tunix.md, measured). Mesh axes here (those the batch is
      sharded over, e.g. ``("data",)``) select **per-shard statistics**
      instead: the mean over the ``n`` shards of the statistics of ``n·G_k``
      (each shard's gradient rescaled to the batch), which needs only an
      all-reduce of the ``d_in + d_out`` statistics. They are not the
      statistics of ``G`` (an option of this library, not the paper's;
      :func:`adaprelora_jax._src.maths.weight_statistics.einsum_weight_statistics`).
      The batch must be the major token axis of each op's input, split
      evenly over these axes of the current mesh (``jax.set_mesh``). A
      number ``n`` instead computes the same statistics for ``n`` shards
      with no mesh (e.g. to compare them with global ones on one device).
    disable_jit: as in ``qwix.LoraProvider``.
    **kwargs: a ``qwix.LoraRule``'s fields, as in ``qwix.LoraProvider``.

  Raises:
    ValueError: at trace time, if ``statistics_batch_axes`` names an axis
      the current mesh does not have, or an op's layout has no exact
      statistics (naming the weight).

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adaprelora_jax import qwix as ap_qwix
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> provider = ap_qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0)
    >>> model = ap_qwix.apply_lora_to_model(
    ...   model, provider, jnp.ones((1, 8)), rngs=nnx.Rngs(1))
    >>> model.kernel_lora_a.shape, model.kernel_grad_sq_rows.shape
    ((8, 2), (8, 1))
    >>> model.kernel_lora_b.shape, model.kernel_grad_sq_cols.shape
    ((2, 4), (1, 4))
  """

  def __init__(
    self,
    rules: Sequence[qwix.LoraRule] | None = None,
    *,
    statistics_batch_axes: Sequence[str] | int | None = None,
    disable_jit: bool = False,
    **kwargs: Any,
  ):
    super().__init__(rules, disable_jit=disable_jit, **kwargs)
    if isinstance(statistics_batch_axes, int):
      validation.check_positive("statistics_batch_axes", statistics_batch_axes)
    elif statistics_batch_axes is not None:
      statistics_batch_axes = tuple(statistics_batch_axes)
    self.statistics_batch_axes = statistics_batch_axes

  def dot_general(
    self,
    lhs: jax.Array,
    rhs: Any,
    dimension_numbers: jax.lax.DotDimensionNumbers,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    out_sharding: jax.sharding.NamedSharding | None = None,
  ) -> jax.Array:
    """qwix's LoRA ``dot_general``, reporting the weight's G² statistics."""
    outputs = super().dot_general(
      lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding=out_sharding
    )
    found = self._lora_weight("dot_general", rhs)
    if found is None:
      return outputs
    weight_name, scale = found
    layout = dot_general_layout(lhs.ndim, rhs.ndim, dimension_numbers)
    b_rank_axis = len(dimension_numbers[1][1])
    spec = self._statistics_spec(layout, scale)
    return _with_statistics(outputs, lhs, weight_name, spec, b_rank_axis)

  def einsum(self, einsum_str: str, *operands: Any, **kwargs: Any) -> jax.Array:
    """qwix's LoRA ``einsum``, reporting the weight's G² statistics."""
    outputs = super().einsum(einsum_str, *operands, **kwargs)
    if len(operands) != 2:
      return outputs
    lhs, rhs = operands
    found = self._lora_weight("einsum", rhs)
    if found is None:
      return outputs
    weight_name, scale = found
    layout = einsum_layout(einsum_str, lhs.ndim, rhs.ndim)
    spec = self._statistics_spec(layout, scale)
    return _with_statistics(outputs, lhs, weight_name, spec, b_rank_axis=0)

  def _statistics_spec(self, layout: EinsumWeightLayout, scale: float) -> StatisticsSpec:
    axes = self.statistics_batch_axes
    if axes is None:
      return StatisticsSpec(layout, scale)
    if isinstance(axes, int):
      return StatisticsSpec(layout, scale, groups=axes)
    mesh = jax.sharding.get_abstract_mesh()
    missing = [axis for axis in axes if axis not in mesh.axis_names]
    if missing:
      raise ValueError(
        f"LoraProvider(statistics_batch_axes={axes}): the current mesh has no axis "
        f"{missing} (its axes: {mesh.axis_names}); call the model under jax.set_mesh."
      )
    groups = math.prod(mesh.shape[axis] for axis in axes)
    return StatisticsSpec(layout, scale, groups, axes)

  def _lora_weight(self, op_name: str, rhs: Any) -> tuple[str, float] | None:
    """``(weight name, alpha / rank)`` if qwix just added LoRA to this op."""
    # repeated_call: the op id qwix's own LoRA op took, not a new one.
    rule, _ = self._get_current_rule_and_op_id(op_name, repeated_call=True)
    if not isinstance(rule, qwix.LoraRule):
      return None
    weight_name = flax_util.find_param(rhs, ptq.WithAux)
    if weight_name is None:
      return None
    return weight_name, rule.alpha / rule.rank


def _with_statistics(
  outputs: jax.Array,
  inputs: jax.Array,
  weight_name: str,
  spec: StatisticsSpec,
  b_rank_axis: int,
) -> jax.Array:
  """Creates (or reads) the weight's probes and routes the statistics to them."""
  module = flax_util.get_current_module()
  try:
    check_einsum_weight_layout(spec.layout)
  except ValueError as error:
    path = "/".join(map(str, flax_util.get_current_module_path()))
    raise ValueError(
      f"adaprelora_jax.qwix.LoraProvider: no exact statistics for weight "
      f"'{path}/{weight_name}': {error} Exclude this module from the "
      "provider's module_path (its pairs then use tangent statistics)."
    ) from error
  lora_a = _factor(module, weight_name + "_lora_a")
  lora_b = _factor(module, weight_name + "_lora_b")
  a_shape = tuple(flax_util.unbox(lora_a).shape)
  b_shape = list(flax_util.unbox(lora_b).shape)
  b_shape[b_rank_axis] = 1
  rows_probe = flax_util.get_or_create_param(
    weight_name + ROW_STATS_SUFFIX,
    lambda: _probe_init(lora_a, (*a_shape[:-1], 1)),
    nnx_param_type=GradientStatistic,
  )
  cols_probe = flax_util.get_or_create_param(
    weight_name + COL_STATS_SUFFIX,
    lambda: _probe_init(lora_b, tuple(b_shape)),
    nnx_param_type=GradientStatistic,
  )
  return report_statistics(outputs, inputs, rows_probe, cols_probe, spec)
