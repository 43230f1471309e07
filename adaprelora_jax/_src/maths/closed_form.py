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
"""Closed-form AdaPreLoRA math for one LoRA pair.

Every function here works on a single pair in the flax layout
``lora_a: (d_in, r)``, ``lora_b: (r, d_out)`` with ``ΔW = lora_a @ lora_b``;
the transform maps them over stacked pairs with ``jax.vmap``. The public
:func:`factor_update` also accepts leading (layer) axes.

Notation (``docs/design.md`` §1-§4): ``G = ∂L/∂W`` (d_in, d_out) is never
formed; the factor gradients are ``g_a = G bᵀ`` and ``g_b = aᵀ G``. The
Adafactor preconditioner is the two-sided diagonal map
``H[X] = diag(p) X diag(q)``. The gauge rules live in
:mod:`adaprelora_jax._src.maths.gauge`.

All algebra runs in float32 or wider, whatever the parameter dtype, and uses
only ops that lower on TPU (``cholesky``, ``triangular_solve``, ``eigh``).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adaprelora_jax._src.maths import gauge
from adaprelora_jax._src.maths import linalg
from adaprelora_jax._src.maths import tangent
from adaprelora_jax._src.maths.linalg import compute_dtype
from adaprelora_jax._src.maths.linalg import matmul

TieBreaker = Literal["min_imbalance", "equal_norms", "half", "factor_norm", "second_order"]
TIE_BREAKERS: tuple[str, ...] = tuple(gauge.RULES)


class FactorStep(NamedTuple):
  """Result of the closed-form step for one pair.

  Attributes:
    delta_a: preconditioned direction for ``lora_a`` (d_in, r).
    delta_b: preconditioned direction for ``lora_b`` (r, d_out).
    theta: the θ-line member the gauge rule picked (scalar in [0, 1]; ½ for
      ``"min_imbalance"``, whose step is that member for the factor
      gradients of one ``G``).
    descent: ``u + v − w``, which equals ``⟨G, δW⟩ = ⟨g_a, δa⟩ + ⟨g_b, δb⟩``
      for the factor gradients of one ``G``; without damping this is
      ``‖δW‖²_H``, the squared H-norm of the projected step (non-negative even
      with damping).
  """

  delta_a: jax.Array
  delta_b: jax.Array
  theta: jax.Array
  descent: jax.Array


def factor_step(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  row_scale: jax.Array,
  col_scale: jax.Array,
  *,
  damping: jax.typing.ArrayLike = 0.0,
  damping_floor: jax.typing.ArrayLike = 0.0,
  tie_breaker: TieBreaker = "min_imbalance",
  pseudo_inverse: linalg.InverseMode = False,
  cross: tuple[jax.Array, jax.Array] | None = None,
) -> FactorStep:
  """Closed-form AdaPreLoRA step of one pair, with diagnostics.

  See :func:`factor_update` for the maths. ``damping_floor`` is given in units
  of a squared factor norm per rank component: the floor added to ``S_a`` is
  ``damping_floor · mean(p)`` and to ``S_b`` is ``damping_floor · mean(q)``, so
  it does not depend on how the Kronecker scale is split between ``p`` and
  ``q`` (``H`` is unchanged by ``(αp, q/α)``). The factor gradients are used
  as given (see :func:`adaprelora_jax._src.maths.tangent.consistent_gradients`).

  All inputs must be 2-D (a single pair) and of a floating dtype; the result is
  in :func:`compute_dtype` of the inputs. ``cross``, if given, is
  ``(aᵀ g_a, g_b bᵀ)`` already computed for these inputs
  (:attr:`PairGrams.cross_a`, :attr:`PairGrams.cross_b`); it saves two
  passes over the factors.
  """
  dtype = compute_dtype(lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)
  a, b, g_a, g_b, p, q = (
    x.astype(dtype) for x in (lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)
  )
  # S_a = aᵀ diag(p) a, S_b = b diag(q) bᵀ, K_a = aᵀ g_a, K_b = g_b bᵀ:
  # docs/design.md §3.
  gram_a = matmul(a.T, p[:, None] * a)
  gram_b = matmul(b * q[None, :], b.T)
  if cross is None:
    shared_a, shared_b = matmul(a.T, g_a), matmul(g_b, b.T)
  else:
    shared_a, shared_b = (x.astype(dtype) for x in cross)
  inverse_a, inverse_b = (
    linalg.psd_inverse(
      gram,
      damping=damping,
      damping_floor=damping_floor * jnp.mean(scale),
      pseudo_inverse=pseudo_inverse,
    )
    for gram, scale in ((gram_a, p), (gram_b, q))
  )
  # (g_a S_b⁻¹) / p rather than (g_a / p) S_b⁻¹: the scaling then fuses into
  # the element-wise consumers of X_a (⟨g_a, X_a⟩ and the gauge rule's
  # δa = X_a − a C) instead of costing a pass that writes g_a / p.
  x_a = matmul(g_a, inverse_b) / p[:, None]
  x_b = matmul(inverse_a, g_b) / q[None, :]
  core_a = matmul(matmul(inverse_a, shared_a), inverse_b)
  core_b = matmul(matmul(inverse_a, shared_b), inverse_b)
  # u = tr(g_aᵀ diag(1/p) g_a S_b⁻¹) = ⟨g_a, X_a⟩,
  # v = tr(S_a⁻¹ g_b diag(1/q) g_bᵀ) = ⟨g_b, X_b⟩, w = tr(S_a⁻¹ K S_b⁻¹ Kᵀ).
  family = gauge.SolutionFamily(
    lora_a=a,
    lora_b=b,
    row_scale=p,
    col_scale=q,
    x_a=x_a,
    x_b=x_b,
    core_a=core_a,
    core_b=core_b,
    u=jnp.sum(g_a * x_a),
    v=jnp.sum(g_b * x_b),
    w=jnp.sum(core_a * shared_a),
  )
  delta_a, delta_b, theta = gauge.RULES[tie_breaker](family)
  # ⟨G, δW⟩ = ⟨g_a, δa⟩ + ⟨g_b, δb⟩ = u + v − w for every member.
  return FactorStep(delta_a, delta_b, theta, family.u + family.v - family.w)


def _check_pair_shapes(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  row_scale: jax.Array,
  col_scale: jax.Array,
) -> None:
  if lora_a.ndim < 2 or lora_b.ndim < 2:
    raise ValueError(
      "lora_a and lora_b must have at least 2 dimensions ((..., d_in, r) and "
      f"(..., r, d_out)); got {lora_a.shape} and {lora_b.shape}."
    )
  lead = lora_a.shape[:-2]
  d_in, rank = lora_a.shape[-2:]
  if lora_b.shape[:-2] != lead or lora_b.shape[-2] != rank:
    raise ValueError(
      f"lora_b of shape {lora_b.shape} does not match lora_a of shape "
      f"{lora_a.shape}: expected (..., {rank}, d_out) with leading axes {lead}."
    )
  d_out = lora_b.shape[-1]
  for name, array, expected in (
    ("grad_a", grad_a, lora_a.shape),
    ("grad_b", grad_b, lora_b.shape),
    ("row_scale", row_scale, (*lead, d_in)),
    ("col_scale", col_scale, (*lead, d_out)),
  ):
    if array.shape != expected:
      raise ValueError(f"{name} has shape {array.shape}, expected {expected}.")
  for name, array in (
    ("lora_a", lora_a),
    ("lora_b", lora_b),
    ("grad_a", grad_a),
    ("grad_b", grad_b),
    ("row_scale", row_scale),
    ("col_scale", col_scale),
  ):
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype, got {array.dtype}.")


def factor_update(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  row_scale: jax.Array,
  col_scale: jax.Array,
  *,
  damping: jax.typing.ArrayLike = 0.0,
  damping_floor: jax.typing.ArrayLike = 0.0,
  tie_breaker: TieBreaker = "min_imbalance",
  project_gradients: bool = True,
) -> tuple[jax.Array, jax.Array]:
  r"""The AdaPreLoRA closed-form factor update (``docs/design.md`` §3-§4).

  Returns the factor directions ``(δa, δb)`` whose induced weight change
  ``δW = δa @ b + a @ δb`` is the H-orthogonal projection of the
  Adafactor-preconditioned full-weight step ``H⁻¹G`` onto the tangent space
  ``{X b + a Y}`` of the rank-r factorization, with
  ``H[X] = diag(p) X diag(q)``. With ``S_a = aᵀ diag(p) a``,
  ``S_b = b diag(q) bᵀ`` and ``K = aᵀ g_a``, the solutions are::

    δa = (g_a / p − θ · a S_a⁻¹ K) S_b⁻¹ + a X
    δb = S_a⁻¹ (g_b / q − (1 − θ) · K S_b⁻¹ b) − X b

  for every θ and r×r ``X``: all give the same ``δW``. The gauge is fixed by
  ``tie_breaker``; the default is the paper's rule, the member minimizing
  ``‖δa b − a δb‖_H``, which is θ = ½, ``X = 0`` for backprop gradients.
  Like optax ``scale_by_*`` transforms the result has the sign of the gradient
  (a descent step is ``a − η δa``).

  With ``damping == damping_floor == 0`` (concrete or traced) the inverses
  are eigh-based pseudo-inverses and the result is exact, including
  rank-deficient factors and ``lora_b = 0`` (then ``δa = 0`` and
  ``δb = S_a⁻¹ g_b / q``). With damping, ``S + (damping · tr(S)/r + floor) I``
  is inverted by Cholesky.

  Example::

    >>> import jax.numpy as jnp
    >>> from adaprelora_jax import factor_update
    >>> a, b = jnp.ones((4, 2)).at[0, 1].set(2.0), jnp.zeros((2, 3))
    >>> grad_w = jnp.arange(12.0).reshape(4, 3)
    >>> da, db = factor_update(a, b, grad_w @ b.T, a.T @ grad_w,
    ...                        jnp.ones(4), jnp.ones(3))
    >>> da.shape, db.shape
    ((4, 2), (2, 3))
    >>> bool(jnp.all(da == 0))  # b = 0: only b moves
    True

  Args:
    lora_a: ``a`` of shape (..., d_in, r).
    lora_b: ``b`` of shape (..., r, d_out).
    grad_a: ``∂L/∂a = G bᵀ``, same shape as ``lora_a``.
    grad_b: ``∂L/∂b = aᵀ G``, same shape as ``lora_b``.
    row_scale: ``p`` (..., d_in), positive row scales of ``H``.
    col_scale: ``q`` (..., d_out), positive column scales of ``H``.
    damping: relative damping of the two r×r solves (0 = exact).
    damping_floor: absolute damping floor, in units of a squared factor norm
      per rank component (see :func:`factor_step`).
    tie_breaker: the gauge rule (:mod:`adaprelora_jax._src.maths.gauge`):
      ``"min_imbalance"`` (default; the paper's rule), ``"equal_norms"`` (an
      earlier reading, not the paper's: equalize the H-norms of ``δa @ b`` and
      ``a @ δb`` along θ, clipped to [0, 1]), ``"half"`` (θ = ½),
      ``"factor_norm"`` (balance ``Σ p_i δa_ik²`` against ``Σ q_j δb_kj²``) or
      ``"second_order"`` (θ ∈ [0, 1] minimizing ``‖δa δb‖_H``, the only part
      of a finite step's weight change that the gauge affects).
    project_gradients: first remove the gauge component of factor gradients
      that are not those of one ``G``
      (:func:`adaprelora_jax._src.maths.tangent.consistent_gradients`); a
      no-op for backprop gradients. Without it such gradients give steps that grow
      without bound as a factor vanishes.

  Returns:
    ``(delta_a, delta_b)`` with the shapes and dtypes of ``lora_a``, ``lora_b``.

  Raises:
    ValueError: for mismatched shapes, non-floating dtypes or an unknown
      ``tie_breaker``.

  References:
    Bian, Cai, Liu, `AdaPreLoRA: adaptive preconditioned low-rank adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.
  """
  _check_pair_shapes(lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)
  gauge.check_rule(tie_breaker)
  # Exactness is decided at run time unless the damping is a concrete zero,
  # so a traced zero (damping under jit, a swept hyperparameter) is exact too.
  exact = _is_concrete_zero(damping) and _is_concrete_zero(damping_floor)
  delta_a, delta_b = _mapped_factor_update(
    lora_a,
    lora_b,
    grad_a,
    grad_b,
    row_scale,
    col_scale,
    damping,
    damping_floor,
    tie_breaker=tie_breaker,
    pseudo_inverse=True if exact else "auto",
    project_gradients=project_gradients,
  )
  return delta_a.astype(lora_a.dtype), delta_b.astype(lora_b.dtype)


@functools.partial(jax.jit, static_argnames=("tie_breaker", "pseudo_inverse", "project_gradients"))
def _mapped_factor_update(
  lora_a,
  lora_b,
  grad_a,
  grad_b,
  row_scale,
  col_scale,
  damping,
  damping_floor,
  *,
  tie_breaker,
  pseudo_inverse,
  project_gradients,
):
  """:func:`factor_step` mapped over the leading (layer) axes."""

  def single(a, b, g_a, g_b, p, q):
    if project_gradients:
      g_a, g_b = tangent.consistent_gradients(a, b, g_a, g_b)
    step = factor_step(
      a,
      b,
      g_a,
      g_b,
      p,
      q,
      damping=damping,
      damping_floor=damping_floor,
      tie_breaker=tie_breaker,
      pseudo_inverse=pseudo_inverse,
    )
    return step.delta_a, step.delta_b

  for _ in range(lora_a.ndim - 2):
    single = jax.vmap(single)
  return single(lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)


def _is_concrete_zero(value: jax.typing.ArrayLike) -> bool:
  try:
    # Through numpy: a tracer raises TracerArrayConversionError, a TypeError.
    return float(np.asarray(value)) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


def factored_scales(
  row_second_moment: jax.Array, col_second_moment: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Row and column scales ``(p, q)`` of ``H`` from Adafactor statistics.

  Adafactor's factored estimate is ``V̂ = v_row v_colᵀ / mean(v_row)``
  (optax ``scale_by_factored_rms``); ``sqrt(V̂) = p qᵀ`` with
  ``p = sqrt(v_row / mean(v_row))`` and ``q = sqrt(v_col)``.
  """
  # A dead feature gives a zero row of G; with large gradients eps/mean(v_row)
  # underflows and p would be 0 (0/0 in g_a / p). Floor at the smallest normal.
  tiny = jnp.finfo(row_second_moment.dtype).tiny
  ratio = row_second_moment / jnp.mean(row_second_moment, axis=-1, keepdims=True)
  p = jnp.sqrt(jnp.maximum(ratio, tiny))
  q = jnp.sqrt(jnp.maximum(col_second_moment, tiny))
  return p, q
