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
"""What a per-pair kernel receives and returns.

A kernel (:func:`adaprelora_jax._src.maths.pair_update.update_pair`, and
those of LoRA-Pro, LoRA-RITE and the Riemannian preconditioner) is a function
of one LoRA pair: it receives a :class:`PairInputs` and the pair's state and
returns a :class:`KernelResult`. The engine
(:mod:`adaprelora_jax._src.engine.pairwise`) gathers the inputs of every
pair and stores the results; the kernels know nothing of trees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from adaprelora_jax._src.maths import linalg


class PairInputs(NamedTuple):
  """One LoRA pair as a kernel sees it (canonical layout, parameter dtype).

  Attributes:
    lora_a: ``a`` (d_in, r).
    lora_b: ``b`` (r, d_out).
    grad_a: ``∂L/∂a`` (d_in, r).
    grad_b: ``∂L/∂b`` (r, d_out).
    row_stats: exact row means of ``G²`` (d_in,) when the pair carries
      statistics probes and the transform asked for them, else None.
    col_stats: likewise, column means (d_out,).
    lora_scale: the pair's LoRA scale ``s`` from the pairing
      (:attr:`adaprelora_jax.pairing.LoRARole.scale`, the model computes
      ``x·(s·a·b)``), a float32 scalar; None when every pair of the group
      has ``s = 1``.
  """

  lora_a: jax.Array
  lora_b: jax.Array
  grad_a: jax.Array
  grad_b: jax.Array
  row_stats: jax.Array | None = None
  col_stats: jax.Array | None = None
  lora_scale: jax.Array | None = None

  def promoted(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(a, b, g_a, g_b)`` in :func:`adaprelora_jax._src.maths.linalg.compute_dtype`."""
    dtype = linalg.compute_dtype(self.lora_a, self.lora_b, self.grad_a, self.grad_b)
    return (
      self.lora_a.astype(dtype),
      self.lora_b.astype(dtype),
      self.grad_a.astype(dtype),
      self.grad_b.astype(dtype),
    )


class KernelResult(NamedTuple):
  """What a kernel returns for one pair (stacked over a group by
  :func:`adaprelora_jax._src.engine.pairwise.map_groups`).

  Attributes:
    delta_a: the update of ``a`` (d_in, r), any floating dtype (cast to the
      parameter dtype when scattered).
    delta_b: the update of ``b`` (r, d_out).
    state: the pair's new state, of the transform's per-pair NamedTuple type
      (None for a transform without per-pair state).
    metrics: the kernel's own per-pair scalars (may be empty; read only with
      ``metrics=True``; a ``"skipped"`` flag counts skipped pairs).
  """

  delta_a: jax.Array
  delta_b: jax.Array
  state: Any
  metrics: dict[str, jax.Array]


# kernel(inputs, state, count, total) -> KernelResult: ``inputs`` is a
# PairInputs (or what ``prepare_pair`` returned), ``state`` the pair's
# per-pair NamedTuple (None without per-pair state), ``count`` the number of
# previous updates and ``total`` the sum over all pairs of prepare_pair's
# scalar (None without it).
PairKernel = Callable[[Any, Any, jax.Array, jax.Array | None], KernelResult]
PreparePair = Callable[[PairInputs], tuple[Any, jax.Array]]
