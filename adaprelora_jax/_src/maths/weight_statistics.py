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
"""Exact Adafactor statistics of a weight gradient, from a layer's backward pass.

For a layer ``y = x W`` the full weight gradient is ``G = xᵀ δ`` (``δ`` the
output cotangent). Its row and column means of ``G²`` are what AdaPreLoRA's
preconditioner is built from (``docs/design.md`` §5, ``"exact"`` mode); these
functions compute them from ``x`` and ``δ`` without forming ``G`` when that is
cheaper. Pure ``jax.numpy``: the LoRA layers of :mod:`adaprelora_jax.nn` and
the qwix provider of :mod:`adaprelora_jax.qwix` call them inside their
custom VJPs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def gradient_square_sums(inputs: jax.Array, output_grads: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row and column sums of ``G²`` for ``G = inputsᵀ @ output_grads``.

  Costs ``2 T² (d_in + d_out)`` flops via ``rows = diag(xᵀ (δ δᵀ) x)`` and
  ``cols = diag(δᵀ (x xᵀ) δ)`` or ``T d_in d_out`` by forming ``G``; the
  cheaper one is chosen from the (static) shapes.

  Args:
    inputs: layer inputs ``x`` of shape (T, d_in) (T = all tokens).
    output_grads: cotangent of the layer output ``δ`` of shape (T, d_out).

  Returns:
    ``(Σ_j G_ij² (d_in,), Σ_i G_ij² (d_out,))`` in float32 or wider.
  """
  dtype = jnp.result_type(jnp.float32, inputs.dtype, output_grads.dtype)
  x = inputs.astype(dtype)
  delta = output_grads.astype(dtype)
  tokens, d_in = x.shape
  d_out = delta.shape[1]
  precision = jax.lax.Precision.HIGHEST
  if 2 * tokens * (d_in + d_out) < d_in * d_out:
    delta_gram = jnp.matmul(delta, delta.T, precision=precision)
    input_gram = jnp.matmul(x, x.T, precision=precision)
    row_sums = jnp.sum(x * jnp.matmul(delta_gram, x, precision=precision), axis=0)
    col_sums = jnp.sum(delta * jnp.matmul(input_gram, delta, precision=precision), axis=0)
    # Quadratic forms of PSD Grams; rounding alone can take them below zero.
    return jnp.maximum(row_sums, 0.0), jnp.maximum(col_sums, 0.0)
  grad_w = jnp.matmul(x.T, delta, precision=precision)
  squared = grad_w * grad_w
  return jnp.sum(squared, axis=1), jnp.sum(squared, axis=0)


def gradient_statistics(inputs: jax.Array, output_grads: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row and column means of ``G²`` for ``G = inputsᵀ @ output_grads``.

  Args:
    inputs: layer inputs ``x`` of shape (T, d_in) (T = all tokens).
    output_grads: cotangent of the layer output ``δ`` of shape (T, d_out).

  Returns:
    ``(mean_j G_ij² (d_in,), mean_i G_ij² (d_out,))`` in float32 or wider,
    by :func:`gradient_square_sums`.
  """
  row_sums, col_sums = gradient_square_sums(inputs, output_grads)
  return row_sums / output_grads.shape[1], col_sums / inputs.shape[1]


class EinsumWeightLayout(NamedTuple):
  """How a weight ``W`` enters ``y = einsum(x, W)`` and how its LoRA pair
  flattens it, one character per axis (``jnp.einsum`` letters).

  The pair's matrix is ``(*lead, d_in, d_out)`` with ``d_in`` the product of
  ``in_chars`` and ``d_out`` that of ``out_chars`` (major first), as the
  pair's factors ``a (*lead, *in, r)`` and ``b (*lead, r, *out)`` lay it out
  (``docs/design.md`` §9).

  Attributes:
    inputs: the characters of ``x``.
    outputs: the characters of ``y``.
    lead: the weight's axes kept as the pair's batch axes (a batched
      ``dot_general``'s batch dimensions); also in ``inputs`` and ``outputs``.
    in_chars: the weight's axes shared with ``x`` (contracting, or an einsum
      batch axis such as an expert axis, which qwix folds into ``d_in``).
    out_chars: the weight's axes shared only with ``y``.
  """

  inputs: str
  outputs: str
  lead: str
  in_chars: str
  out_chars: str


def check_einsum_weight_layout(layout: EinsumWeightLayout) -> None:
  """Raises if ``layout`` is not one :func:`einsum_weight_statistics` reads.

  Raises:
    ValueError: naming the axis, if a weight axis is missing from ``x`` or
      ``y`` where it must be present, or an axis of ``y`` comes from nowhere.
  """
  weight = layout.lead + layout.in_chars + layout.out_chars
  where = f"einsum '{layout.inputs},{weight}->{layout.outputs}'"
  if len(set(weight)) != len(weight):
    raise ValueError(f"{where}: a weight axis is repeated.")
  for char in layout.lead:
    if char not in layout.inputs or char not in layout.outputs:
      raise ValueError(f"{where}: batch axis {char!r} must be in the input and the output.")
  for char in layout.in_chars:
    if char not in layout.inputs:
      raise ValueError(f"{where}: input-side weight axis {char!r} is not in the input.")
  for char in layout.out_chars:
    if char not in layout.outputs or char in layout.inputs:
      raise ValueError(
        f"{where}: output-side weight axis {char!r} must be in the output only "
        "(a weight axis summed away has no exact statistics here)."
      )
  for char in layout.outputs:
    if char not in layout.inputs and char not in weight:
      raise ValueError(f"{where}: output axis {char!r} is in neither operand.")


def einsum_weight_statistics(
  inputs: jax.Array,
  output_grads: jax.Array,
  layout: EinsumWeightLayout,
  *,
  groups: int = 1,
  group_axes: tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Row and column means of ``G²`` for the weight of ``y = einsum(x, W)``.

  ``G = ∂L/∂W`` is taken in the pair's flattened layout
  ``(*lead, d_in, d_out)`` (:class:`EinsumWeightLayout`). Weight axes that
  are einsum batch axes but part of ``d_in`` (an expert axis ``E`` of
  ``'EBD,EDF->EBF'``) make ``G`` block-structured: each block is
  ``x_eᵀ δ_e`` over the tokens of that expert, so rows come per block and
  columns are summed over blocks. Input axes in neither the weight nor the
  output are summed first (as the einsum does).

  With ``groups = n > 1`` the tokens (major axis first, e.g. the batch) are
  split into ``n`` contiguous groups and the result is the mean over groups
  of the statistics of ``n·G_k``, each group's gradient rescaled to the
  whole batch (``n·G_k`` is the gradient of the group's own mean loss when
  the loss is a mean over the batch): per-shard statistics, which data
  parallelism computes with no weight-sized all-reduce. They are not the
  statistics of ``G = Σ_k G_k``.

  Args:
    inputs: ``x``, laid out as ``layout.inputs``.
    output_grads: ``δ = ∂L/∂y``, laid out as ``layout.outputs``.
    layout: the weight's axes (checked by :func:`check_einsum_weight_layout`).
    groups: number of token groups (1: the statistics of ``G``).
    group_axes: mesh axes the groups are laid out on (a sharding hint, so
      that each device forms its own group's statistics); None: no hint.

  Returns:
    ``(rows (*lead, d_in), cols (*lead, d_out))``, means over ``d_out`` and
    ``d_in`` respectively, in float32 or wider.

  Raises:
    ValueError: if ``layout`` is not readable (see
      :func:`check_einsum_weight_layout`), or the tokens do not split into
      ``groups``.
  """
  check_einsum_weight_layout(layout)
  sizes = dict(zip(layout.inputs, inputs.shape, strict=True))
  sizes.update(zip(layout.outputs, output_grads.shape, strict=True))
  # In-side weight axes that are also in y are blocks of G (the expert axis);
  # the others are contracted with x.
  blocks = "".join(c for c in layout.in_chars if c in layout.outputs)
  contracted = "".join(c for c in layout.in_chars if c not in layout.outputs)
  weight = layout.lead + layout.in_chars + layout.out_chars
  tokens = "".join(c for c in layout.inputs if c in layout.outputs and c not in weight)

  def size(chars: str) -> int:
    return math.prod(sizes[c] for c in chars)

  batch = layout.lead + blocks
  x = jnp.einsum(f"{layout.inputs}->{batch}{tokens}{contracted}", inputs)
  delta = jnp.einsum(f"{layout.outputs}->{batch}{tokens}{layout.out_chars}", output_grads)
  if size(tokens) % groups:
    raise ValueError(f"{size(tokens)} tokens do not split into {groups} groups.")
  grouped = (size(batch), groups, size(tokens) // groups)
  x = x.reshape(*grouped, size(contracted))
  delta = delta.reshape(*grouped, size(layout.out_chars))
  if group_axes is not None:
    spec = jax.sharding.PartitionSpec(None, group_axes)
    x = jax.lax.with_sharding_constraint(x, spec)
    delta = jax.lax.with_sharding_constraint(delta, spec)
  row_sums, col_sums = jax.vmap(jax.vmap(gradient_square_sums))(x, delta)
  # Mean over groups of the statistics of groups·G_k.
  row_sums, col_sums = groups * row_sums.sum(axis=1), groups * col_sums.sum(axis=1)
  lead_shape = tuple(sizes[c] for c in layout.lead)
  # Rows: (lead, blocks, contracted) into the pair's d_in order.
  row_sums = row_sums.reshape(tuple(sizes[c] for c in batch + contracted))
  rows_order = batch + contracted
  target = layout.lead + layout.in_chars
  if rows_order != target:
    row_sums = jnp.einsum(f"{rows_order}->{target}", row_sums)
  d_in, d_out = size(layout.in_chars), size(layout.out_chars)
  rows = row_sums.reshape((*lead_shape, d_in)) / d_out
  # Columns: summed over the blocks of G.
  col_sums = col_sums.reshape((*lead_shape, size(blocks), d_out)).sum(axis=-2)
  return rows, col_sums / d_in
