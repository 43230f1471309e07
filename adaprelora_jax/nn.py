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
"""Flax nnx LoRA layers that report exact Adafactor statistics.

:class:`LoRA` and :class:`LoRALinear` are drop-in replacements for
``nnx.LoRA``/``nnx.LoRALinear`` (same arguments, parameter names and
initial values). They add two zero-valued leaves, ``grad_sq_rows`` (d_in,)
and ``grad_sq_cols`` (d_out,), of type :class:`GradientStatistic` (a
``nnx.LoRAParam``). Their *gradient* is the row/column mean of ``G²`` for the
layer's full weight gradient ``G = ∂L/∂W``, computed in the backward pass by a
custom VJP without materializing ``G`` when that is cheaper. The gradient tree
thus carries the exact statistics to :func:`adaprelora_jax.adaprelora`, which
stays a plain optax transform (docs/design.md §5, ``"exact"`` mode).

Caveats: transforms applied to the gradients *before* ``adaprelora`` (e.g.
``optax.clip_by_global_norm``) see these leaves too; a layer called several
times in one forward pass sums per-call statistics (the exact statistic of the
summed gradient is not available then); with gradient accumulation the
statistics are averaged per micro-batch.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn import initializers
from flax.typing import Dtype
from flax.typing import Initializer
from flax.typing import PromoteDtypeFn

from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.maths.weight_statistics import gradient_statistics

__all__ = ["GradientStatistic", "LoRA", "LoRALinear", "gradient_statistics", "lora_product"]

default_a_initializer = initializers.he_uniform()
default_b_initializer = initializers.zeros


class GradientStatistic(nnx.LoRAParam):
  """Zero-valued leaf whose gradient is an exact Adafactor statistic.

  A subclass of ``nnx.LoRAParam`` so that ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``
  and ``nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`` include it.
  """


@jax.custom_vjp
def lora_product(
  x: jax.Array,
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_sq_rows: jax.Array,
  grad_sq_cols: jax.Array,
) -> jax.Array:
  """``x @ lora_a @ lora_b``; the probes' cotangents are the G² statistics."""
  del grad_sq_rows, grad_sq_cols
  return x @ lora_a @ lora_b


def _lora_product_fwd(x, lora_a, lora_b, grad_sq_rows, grad_sq_cols):
  hidden = x @ lora_a
  residuals = (x, lora_a, lora_b, hidden, grad_sq_rows, grad_sq_cols)
  return hidden @ lora_b, residuals


def _lora_product_bwd(residuals, output_grad):
  x, lora_a, lora_b, hidden, grad_sq_rows, grad_sq_cols = residuals
  d_in, rank = lora_a.shape
  d_out = lora_b.shape[1]
  hidden_grad = output_grad @ lora_b.T
  x_grad = (hidden_grad @ lora_a.T).astype(x.dtype)
  tokens_x = x.reshape(-1, d_in)
  tokens_grad = output_grad.reshape(-1, d_out)
  grad_a = (tokens_x.T @ hidden_grad.reshape(-1, rank)).astype(lora_a.dtype)
  grad_b = (hidden.reshape(-1, rank).T @ tokens_grad).astype(lora_b.dtype)
  rows, cols = gradient_statistics(tokens_x, tokens_grad)
  return (x_grad, grad_a, grad_b, rows.astype(grad_sq_rows.dtype), cols.astype(grad_sq_cols.dtype))


lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


def _statistics_metadata(factor_metadata: tp.Mapping[str, tp.Any], axis: int) -> dict[str, tp.Any]:
  """Sharding metadata of a statistics vector, taken from one factor axis."""
  metadata = {}
  # flax renamed the partitioning annotation over time; accept each spelling.
  for key in ("out_sharding", "sharding_names", "sharding"):
    if key in factor_metadata and factor_metadata[key] is not None:
      metadata[key] = (tuple(factor_metadata[key])[axis],)
  return metadata


class LoRA(nnx.LoRA):
  """``nnx.LoRA`` that also reports exact gradient statistics.

  Parameters: ``lora_a`` (in_features, lora_rank), ``lora_b``
  (lora_rank, out_features), and zero-valued ``grad_sq_rows``
  (in_features,) and ``grad_sq_cols`` (out_features,) whose gradients are the
  row/column means of ``G²`` (see the module docstring).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from adaprelora_jax import nn
    >>> layer = nn.LoRA(3, 2, 4, rngs=nnx.Rngs(0))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer.grad_sq_rows.shape
    ((3, 2), (2, 4), (3,))
    >>> x = jnp.ones((16, 3))
    >>> grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    >>> grads['grad_sq_cols'].shape
    (4,)

  Args: as ``nnx.LoRA``.
  """

  def __init__(
    self,
    in_features: int,
    lora_rank: int,
    out_features: int,
    *,
    base_module: nnx.Module | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    a_initializer: Initializer = default_a_initializer,
    b_initializer: Initializer = default_b_initializer,
    lora_param_type: type[nnx.Variable] = nnx.LoRAParam,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    a_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    b_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    super().__init__(
      in_features,
      lora_rank,
      out_features,
      base_module=base_module,
      dtype=dtype,
      param_dtype=param_dtype,
      a_initializer=a_initializer,
      b_initializer=b_initializer,
      lora_param_type=lora_param_type,
      promote_dtype=promote_dtype,
      rngs=rngs,
      a_metadata=a_metadata,
      b_metadata=b_metadata,
    )
    # Statistics are float32 whatever the parameter dtype.
    setattr(
      self,
      pairing_lib.ROW_STATS_NAME,
      GradientStatistic(
        jnp.zeros((in_features,), jnp.float32), **_statistics_metadata(a_metadata, 0)
      ),
    )
    setattr(
      self,
      pairing_lib.COL_STATS_NAME,
      GradientStatistic(
        jnp.zeros((out_features,), jnp.float32), **_statistics_metadata(b_metadata, 1)
      ),
    )

  def __call__(self, x: jax.Array, **kwargs: tp.Any) -> jax.Array:
    x, lora_a, lora_b = self.promote_dtype(
      (x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
    )
    # The statistics are set by name in __init__ (the names pairing reads).
    out = lora_product(
      x,
      lora_a,
      lora_b,
      getattr(self, pairing_lib.ROW_STATS_NAME)[...],
      getattr(self, pairing_lib.COL_STATS_NAME)[...],
    )
    if self.base_module is not None:
      if not callable(self.base_module):
        raise ValueError("`self.base_module` must be callable.")
      out += self.base_module(x, **kwargs)
    return out


class LoRALinear(nnx.Linear):
  """``nnx.LoRALinear`` whose LoRA part reports exact gradient statistics.

  Same arguments, parameter names (``kernel``, ``bias``, ``lora.lora_a``,
  ``lora.lora_b``) and initial values as ``nnx.LoRALinear``, plus
  ``lora.grad_sq_rows`` and ``lora.grad_sq_cols`` (see :class:`LoRA`).

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adaprelora_jax import nn
    >>> layer = nn.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
    >>> reference = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
    >>> bool(jnp.all(layer.lora.lora_a[...] == reference.lora.lora_a[...]))
    True
    >>> layer(jnp.ones((16, 3))).shape
    (16, 4)

  Args: as ``nnx.LoRALinear``.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    lora_rank: int,
    lora_dtype: Dtype | None = None,
    lora_param_dtype: Dtype = jnp.float32,
    a_initializer: Initializer = default_a_initializer,
    b_initializer: Initializer = default_b_initializer,
    lora_param_type: type[nnx.Variable] = nnx.LoRAParam,
    lora_promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    a_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    b_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    **kwargs: tp.Any,
  ):
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self.lora = LoRA(
      in_features,
      lora_rank,
      out_features,
      dtype=lora_dtype,
      param_dtype=lora_param_dtype,
      a_initializer=a_initializer,
      b_initializer=b_initializer,
      lora_param_type=lora_param_type,
      promote_dtype=lora_promote_dtype,
      rngs=rngs,
      a_metadata=a_metadata,
      b_metadata=b_metadata,
    )

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(x, out_sharding=out_sharding)
    return y + self.lora(x)
