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
"""Dimension numbers of N-D LoRA factors: which axes are batch, rank, in, out.

Every LoRA pair is one matrix map ``ΔW = a.reshape(d_in, r) @ b.reshape(r,
d_out)`` up to a transpose, with batch (layer) axes stacked
(``docs/design.md`` §9). :class:`LoRADimensionNumbers` says which axes are
which; :func:`infer_dimension_numbers` reads them off the shapes for the
layouts of flax nnx, peft and qwix (einsum, MoE, stacked layers) and rejects
shapes that fit several readings, saying how to declare them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class LoRADimensionNumbers(NamedTuple):
  """Which axes of a pair's factors are batch, rank, ``d_in`` and ``d_out``.

  The pair is the matrix map ``ΔW = A @ B`` (docs/design.md §9) with
  ``A = transpose(a, (*a_batch_axes, *a_in_axes, a_rank_axis))`` reshaped to
  ``(*batch, d_in, r)`` and ``B = transpose(b, (*b_batch_axes, b_rank_axis,
  *b_out_axes))`` reshaped to ``(*batch, r, d_out)``: ``d_in`` is the product
  of the ``a_in_axes`` (the first one major), ``d_out`` that of the
  ``b_out_axes``, and the batch axes enumerate independent pairs (stacked or
  scanned layers), matched one to one between ``a`` and ``b``. As in optax
  ``contrib.MuonDimensionNumbers``, negative axes count from the end.

  Examples: flax ``a (d_in, r)``, ``b (r, d_out)`` is the default
  ``LoRADimensionNumbers()``; qwix on ``'BTNH,NHD->BTD'`` gives
  ``a (N, H, r)``, ``b (r, D)``, also the default (``d_in = N·H``); MaxText's
  ``param_scan_axis: 1`` gives ``a (in, L, r)``, ``b (r, L, out)``, which is
  ``LoRADimensionNumbers(a_batch_axes=(1,), b_batch_axes=(1,))``.

  Attributes:
    a_batch_axes: batch axes of ``lora_a``, in order.
    a_rank_axis: the rank axis of ``lora_a``; None: its last non-batch axis.
    b_batch_axes: batch axes of ``lora_b``, in the order of ``a_batch_axes``.
    b_rank_axis: the rank axis of ``lora_b``; None: its first non-batch axis.
    a_in_axes: the axes of ``lora_a`` forming ``d_in``, major first; None:
      all its other axes, in order.
    b_out_axes: the axes of ``lora_b`` forming ``d_out``, major first; None:
      all its other axes, in order.
  """

  a_batch_axes: Sequence[int] = ()
  a_rank_axis: int | None = None
  b_batch_axes: Sequence[int] = ()
  b_rank_axis: int | None = None
  a_in_axes: Sequence[int] | None = None
  b_out_axes: Sequence[int] | None = None

  @property
  def a_permutation(self) -> tuple[int, ...]:
    """The transpose of ``lora_a`` into ``(*batch, *in, rank)`` (normalized
    dimension numbers only)."""
    return normalized(self).a_permutation

  @property
  def b_permutation(self) -> tuple[int, ...]:
    """The transpose of ``lora_b`` into ``(*batch, rank, *out)`` (normalized
    dimension numbers only)."""
    return normalized(self).b_permutation


class NormalizedAxes(NamedTuple):
  """The fields of normalized :class:`LoRADimensionNumbers`, every one set.

  What the shape arithmetic reads (:func:`normalized`): the same values, with
  the types that normalization guarantees (no None).
  """

  a_batch_axes: tuple[int, ...]
  a_rank_axis: int
  b_batch_axes: tuple[int, ...]
  b_rank_axis: int
  a_in_axes: tuple[int, ...]
  b_out_axes: tuple[int, ...]

  @property
  def a_permutation(self) -> tuple[int, ...]:
    """The transpose of ``lora_a`` into ``(*batch, *in, rank)``."""
    return (*self.a_batch_axes, *self.a_in_axes, self.a_rank_axis)

  @property
  def b_permutation(self) -> tuple[int, ...]:
    """The transpose of ``lora_b`` into ``(*batch, rank, *out)``."""
    return (*self.b_batch_axes, self.b_rank_axis, *self.b_out_axes)


def normalized(dims: LoRADimensionNumbers | None) -> NormalizedAxes:
  """The axes of normalized dimension numbers (as ``pairs.PairInfo`` holds them).

  Raises:
    ValueError: if ``dims`` is None or has an unset field, i.e. was not
      normalized (:func:`normalize_dimension_numbers`).
  """
  if (
    dims is None
    or dims.a_rank_axis is None
    or dims.b_rank_axis is None
    or dims.a_in_axes is None
    or dims.b_out_axes is None
  ):
    raise ValueError(f"Expected normalized dimension numbers (every field set), got {dims!r}.")
  return NormalizedAxes(
    tuple(dims.a_batch_axes),
    dims.a_rank_axis,
    tuple(dims.b_batch_axes),
    dims.b_rank_axis,
    tuple(dims.a_in_axes),
    tuple(dims.b_out_axes),
  )


def normalize_dimension_numbers(
  dims: LoRADimensionNumbers,
  a_shape: Sequence[int],
  b_shape: Sequence[int],
  *,
  where: str = "LoRA pair",
) -> LoRADimensionNumbers:
  """Dimension numbers with every field set and every axis non-negative.

  Args:
    dims: declared dimension numbers (None fields take their defaults).
    a_shape: shape of the ``lora_a`` leaf.
    b_shape: shape of the ``lora_b`` leaf.
    where: what the pair is, for error messages.

  Returns:
    The normalized :class:`LoRADimensionNumbers`.

  Raises:
    ValueError: if an axis is out of range or used twice, the factors have
      different numbers of batch axes, or ``d_in`` / ``d_out`` has no axis.
  """
  if not isinstance(dims, LoRADimensionNumbers):
    raise TypeError(f"{where}: dimension_numbers must be a LoRADimensionNumbers, got {dims!r}.")

  def axes(values, ndim, what):
    out = []
    for axis in values:
      if not -ndim <= axis < ndim:
        raise ValueError(f"{where}: {what} axis {axis} is out of range for a {ndim}-D factor.")
      out.append(axis % ndim)
    return tuple(out)

  def side(batch, rank, rest, ndim, factor, first_rank):
    batch = axes(batch, ndim, f"{factor} batch")
    free = [axis for axis in range(ndim) if axis not in batch]
    if rank is None:
      if not free:
        raise ValueError(f"{where}: {factor} has no axis left for the rank.")
      rank = free[0] if first_rank else free[-1]
    (rank,) = axes((rank,), ndim, f"{factor} rank")
    rest = (
      tuple(axis for axis in free if axis != rank)
      if rest is None
      else axes(rest, ndim, f"{factor} d_in/d_out")
    )
    used = (*batch, rank, *rest)
    if sorted(used) != list(range(ndim)):
      raise ValueError(
        f"{where}: the axes of {factor} must be split into batch, rank and "
        f"d_in/d_out, each axis exactly once; got batch {batch}, rank {rank}, "
        f"rest {rest} for a {ndim}-D factor."
      )
    if not rest:
      raise ValueError(f"{where}: {factor} has no axis left for d_in/d_out.")
    return batch, rank, rest

  a_batch, a_rank, a_in = side(
    dims.a_batch_axes, dims.a_rank_axis, dims.a_in_axes, len(a_shape), "lora_a", first_rank=False
  )
  b_batch, b_rank, b_out = side(
    dims.b_batch_axes, dims.b_rank_axis, dims.b_out_axes, len(b_shape), "lora_b", first_rank=True
  )
  if len(a_batch) != len(b_batch):
    raise ValueError(
      f"{where}: lora_a has batch axes {a_batch} but lora_b has {b_batch}; "
      "they are matched one to one."
    )
  return LoRADimensionNumbers(a_batch, a_rank, b_batch, b_rank, a_in, b_out)


def _readings(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> list[LoRADimensionNumbers]:
  """Every layout of docs/design.md §9 that the flax/qwix shapes fit.

  ``lora_a`` ends with the rank; ``lora_b`` starts with it after ``k``
  leading batch axes shared with ``lora_a`` (k = 0: flax 2-D and qwix
  einsum factors; k ≥ 1: stacked layers, qwix batched dot_general). A
  MaxText-style scan axis (``a (in, L, r)``, ``b (r, L, out)``) is listed as
  a reading too, so that such shapes are reported as ambiguous rather than
  read as one cross-layer matrix.
  """
  rank = a_shape[-1]
  found = []
  for k in range(min(len(a_shape), len(b_shape)) - 1):
    if a_shape[:k] == b_shape[:k] and b_shape[k] == rank:
      found.append(
        LoRADimensionNumbers(
          tuple(range(k)),
          len(a_shape) - 1,
          tuple(range(k)),
          k,
          tuple(range(k, len(a_shape) - 1)),
          tuple(range(k + 1, len(b_shape))),
        )
      )
  if len(a_shape) >= 3 and len(b_shape) >= 3 and b_shape[0] == rank and a_shape[-2] == b_shape[1]:
    found.append(
      LoRADimensionNumbers(
        (len(a_shape) - 2,),
        len(a_shape) - 1,
        (1,),
        0,
        tuple(range(len(a_shape) - 2)),
        tuple(range(2, len(b_shape))),
      )
    )
  return found


def _describe(dims: LoRADimensionNumbers, a_shape, b_shape) -> str:
  axes = normalized(dims)
  lead = tuple(a_shape[axis] for axis in axes.a_batch_axes)
  d_in = math.prod(a_shape[axis] for axis in axes.a_in_axes)
  d_out = math.prod(b_shape[axis] for axis in axes.b_out_axes)
  return (
    f"LoRADimensionNumbers(a_batch_axes={axes.a_batch_axes}, "
    f"b_batch_axes={axes.b_batch_axes}): {len(lead) and lead or 'no'} batch, "
    f"d_in {d_in}, r {a_shape[axes.a_rank_axis]}, d_out {d_out}"
  )


def infer_dimension_numbers(
  a_shape: Sequence[int], b_shape: Sequence[int], *, transposed: bool = False
) -> LoRADimensionNumbers:
  """The dimension numbers of a pair from its factor shapes (docs/design.md §9).

  flax / qwix layouts (``transposed=False``): ``lora_a`` is
  ``(*batch, *in, r)`` and ``lora_b`` is ``(*batch, r, *out)`` with the
  batch axes leading both; that covers flax ``(d_in, r)`` / ``(r, d_out)``
  with optional stacked-layer axes, qwix einsum factors (``a (D, r)``,
  ``b (r, N, H)``; ``a (N, H, r)``, ``b (r, D)``; MoE ``a (E, D, r)``,
  ``b (r, F)``) and qwix batched dot_general (``a (L, d, r)``,
  ``b (L, r, d')``). When the shapes fit several such readings, the one
  with every leading axis a batch axis (``a`` and ``b`` of one rank, today's
  stacked-layer layout) is taken; otherwise the shapes are ambiguous.
  peft layout (``transposed=True``): ``lora_A (*batch, r, d_in)``,
  ``lora_B (*batch, d_out, r)``.

  Args:
    a_shape: shape of ``lora_a``.
    b_shape: shape of ``lora_b``.
    transposed: peft (PyTorch) layout.

  Returns:
    Normalized :class:`LoRADimensionNumbers`.

  Raises:
    ValueError: if no layout fits (rank mismatch, differing leading axes) or
      several do; the message says how to declare the axes.
  """
  return infer_for_pair(tuple(a_shape), tuple(b_shape), transposed, "<pair>", "lora_a", "lora_b")


def infer_for_pair(
  a_shape: tuple[int, ...],
  b_shape: tuple[int, ...],
  transposed: bool,
  pair_name: str,
  a_path: str,
  b_path: str,
) -> LoRADimensionNumbers:
  """:func:`infer_dimension_numbers` for a named pair (errors name its paths)."""
  shapes = f"'{a_path}' {a_shape} and '{b_path}' {b_shape}"
  if transposed:
    lead = len(a_shape) - 2
    if len(b_shape) != len(a_shape) or b_shape[:lead] != a_shape[:lead]:
      raise ValueError(f"LoRA pair {pair_name!r}: leading (layer) axes differ between {shapes}.")
    if a_shape[-2] != b_shape[-1]:
      raise ValueError(
        f"LoRA pair {pair_name!r}: rank mismatch between {shapes} "
        "(expected lora_A (r, d_in), lora_B (d_out, r))."
      )
    batch = tuple(range(lead))
    return LoRADimensionNumbers(batch, lead, batch, lead + 1, (lead + 1,), (lead,))
  found = _readings(a_shape, b_shape)
  if len(found) == 1:
    return found[0]
  stacked = [
    dims
    for dims in found
    if len(a_shape) == len(b_shape) and tuple(dims.a_batch_axes) == tuple(range(len(a_shape) - 2))
  ]
  if stacked:
    return stacked[0]
  declare = (
    "Declare the axes with a pairing: pairing=adaprelora_jax.pairing."
    "annotate_pairing(dimension_numbers={"
    f"{pair_name!r}"
    ": "
    "LoRADimensionNumbers(a_batch_axes=..., b_batch_axes=...)}), or return "
    "LoRARole(..., dimension_numbers=...) from a pairing function "
    "(docs/design.md §9)."
  )
  if not found:
    if len(a_shape) == len(b_shape) and b_shape[-2] == a_shape[-1] and a_shape[:-2] != b_shape[:-2]:
      raise ValueError(
        f"LoRA pair {pair_name!r}: leading (layer) axes differ between {shapes}. {declare}"
      )
    raise ValueError(
      f"LoRA pair {pair_name!r}: rank mismatch between {shapes} (expected "
      "lora_a (d_in, r), lora_b (r, d_out): lora_a (..., r) ending with the "
      "rank and lora_b (*batch, r, ...) starting with it after any leading "
      f"batch axes shared with lora_a). {declare}"
    )
  readings = "; ".join(_describe(dims, a_shape, b_shape) for dims in found)
  raise ValueError(
    f"LoRA pair {pair_name!r}: the shapes {shapes} fit several layouts ({readings}). {declare}"
  )
