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

Notation (DESIGN.md §1-§4): ``G = ∂L/∂W`` (d_in, d_out) is never formed; the
factor gradients are ``g_a = G bᵀ`` and ``g_b = aᵀ G``. The Adafactor
preconditioner is the two-sided diagonal map ``H[X] = diag(p) X diag(q)``.

All algebra runs in float32 or wider, whatever the parameter dtype, and uses
only ops that lower on TPU (``cholesky``, ``triangular_solve``, ``eigh``).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from adaprelora_jax import linalg
from adaprelora_jax.linalg import compute_dtype
from adaprelora_jax.linalg import matmul

TieBreaker = Literal["imbalance", "half", "factor_norm", "second_order"]
TIE_BREAKERS: tuple[str, ...] = ("imbalance", "half", "factor_norm", "second_order")


class FactorStep(NamedTuple):
  """Result of the closed-form step for one pair.

  Attributes:
    delta_a: preconditioned direction for ``lora_a`` (d_in, r).
    delta_b: preconditioned direction for ``lora_b`` (r, d_out).
    theta: the gauge parameter that was used (scalar in [0, 1]).
    descent: ``⟨G, δW⟩ = ⟨g_a, δa⟩ + ⟨g_b, δb⟩``; without damping this is
      ``‖δW‖²_H``, the squared H-norm of the projected step (non-negative even
      with damping).
  """

  delta_a: jax.Array
  delta_b: jax.Array
  theta: jax.Array
  descent: jax.Array


def psd_inverse(
    gram: jax.Array,
    *,
    damping: jax.typing.ArrayLike = 0.0,
    damping_floor: jax.typing.ArrayLike = 0.0,
    pseudo_inverse: bool = False,
) -> jax.Array:
  """Inverse of a symmetric PSD r×r matrix, damped or pseudo-inverted.

  Args:
    gram: symmetric positive semi-definite matrix (r, r).
    damping: relative Tikhonov damping; ``damping * trace(gram) / r`` is added
      to the diagonal (scale-free, DESIGN.md §3).
    damping_floor: absolute value added to the diagonal on top of the
      relative damping; keeps the inverse bounded when ``gram`` vanishes
      (e.g. ``lora_b = 0`` at LoRA init).
    pseudo_inverse: if True, ignore the damping and return the Moore-Penrose
      pseudo-inverse via ``eigh`` (eigenvalues below ``r·eps·λ_max`` are
      treated as zero). Exact on rank-deficient Gram matrices.

  Returns:
    The (r, r) inverse.
  """
  if pseudo_inverse:
    return linalg.damped_pseudo_inverse(*linalg.psd_eigh(gram), damping=0.0)
  r = gram.shape[-1]
  eye = jnp.eye(r, dtype=gram.dtype)
  shift = damping * jnp.trace(gram) / r + damping_floor
  # The Gram products are symmetric only up to rounding, but the Cholesky
  # factorization reads only the lower triangle, so no symmetrization is
  # needed (it would add two transposes per solve, which dominate the compile
  # time of the whole optimizer step on CPU).
  cholesky = jax.lax.linalg.cholesky(gram + shift * eye, symmetrize_input=False)
  # A triangular solve gives L⁻¹, and L⁻ᵀL⁻¹ = (LLᵀ)⁻¹ without forming a
  # general inverse.
  inverse_cholesky = jax.lax.linalg.triangular_solve(
      cholesky, eye, left_side=True, lower=True)
  return matmul(inverse_cholesky.T, inverse_cholesky)


def _select_theta(
    tie_breaker: str,
    imbalance_u: jax.Array,
    imbalance_v: jax.Array,
    shared_w: jax.Array,
    x_a: jax.Array,
    a_n: jax.Array,
    x_b: jax.Array,
    n_b: jax.Array,
    row_scale: jax.Array,
    col_scale: jax.Array,
) -> jax.Array:
  """Gauge parameter θ for ``δa = X_a − θ·aN``, ``δb = X_b − (1−θ)·Nb``."""
  half = jnp.asarray(0.5, shared_w.dtype)
  if tie_breaker == "half":
    return half
  if tie_breaker == "imbalance":
    # DESIGN.md §4: ‖δa b‖²_H − ‖a δb‖²_H = u − v + w − 2θw is linear in θ and
    # vanishes at θ* = ½ + (u − v)/(2w); clipped to [0, 1] because outside it
    # the factor updates grow in opposite null-space directions.
    positive = shared_w > 0
    safe_w = jnp.where(positive, shared_w, 1.0)
    theta = 0.5 + (imbalance_u - imbalance_v) / (2.0 * safe_w)
    return jnp.where(positive, jnp.clip(theta, 0.0, 1.0), half)
  if tie_breaker == "factor_norm":
    # Balance ‖δa‖²_p = Σ p_i δa_ik² against ‖δb‖²_q = Σ q_j δb_kj²; with
    # φ = 1 − θ both are quadratics in θ:
    #   f(θ) = ‖X_a‖²_p − 2θ⟨X_a, aN⟩_p + θ²‖aN‖²_p
    #          − (‖X_b‖²_q − 2(1−θ)⟨X_b, Nb⟩_q + (1−θ)²‖Nb‖²_q).
    weighted_a = row_scale[:, None]
    weighted_b = col_scale[None, :]
    xa_xa = jnp.sum(weighted_a * x_a * x_a)
    xa_an = jnp.sum(weighted_a * x_a * a_n)
    an_an = jnp.sum(weighted_a * a_n * a_n)
    xb_xb = jnp.sum(weighted_b * x_b * x_b)
    xb_nb = jnp.sum(weighted_b * x_b * n_b)
    nb_nb = jnp.sum(weighted_b * n_b * n_b)
    # f(θ) = c2 θ² + c1 θ + c0.
    c2 = an_an - nb_nb
    c1 = -2.0 * xa_an - 2.0 * xb_nb + 2.0 * nb_nb
    c0 = xa_xa - xb_xb + 2.0 * xb_nb - nb_nb
    coefficients = jnp.stack([c0, c1, c2])
    roots = _quadratic_roots(c2, c1, c0)
    return _argmin_on_unit_interval(coefficients, roots, absolute=True,
                                    relative_tolerance=1e-6)
  if tie_breaker == "second_order":
    return _second_order_theta(x_a, a_n, x_b, n_b, row_scale, col_scale)
  raise ValueError(
      f"tie_breaker must be one of {TIE_BREAKERS}, got {tie_breaker!r}."
  )


def _second_order_theta(
    x_a: jax.Array,
    a_n: jax.Array,
    x_b: jax.Array,
    n_b: jax.Array,
    row_scale: jax.Array,
    col_scale: jax.Array,
) -> jax.Array:
  """θ ∈ [0, 1] minimizing the second-order term ‖δa(θ) δb(θ)‖²_H.

  A step of size η moves ``W`` by ``−η δW + η² δa δb``: the first-order part
  is the same for every θ (DESIGN.md §3), so the second-order term is the only
  part of the weight update that θ controls. It is a quartic in θ built from
  r×r Grams: ``‖δa δb‖²_H = tr(A(θ) B(θ))`` with ``A = δaᵀ diag(p) δa`` and
  ``B = δb diag(q) δbᵀ``, and with ``δa = X_a − θ·aN``,
  ``δb = (X_b − Nb) + θ·Nb`` both Grams are quadratics in θ. Its minimum on
  [0, 1] is at an endpoint or a real root of the derivative (a cubic, solved in
  closed form). Cost O((d_in + d_out) r² + r³). Like the imbalance rule it
  depends on ``(p, q)`` only through ``H = p ⊗ q`` and is invariant under the
  gauge ``(a S, S⁻¹ b)``.
  """
  # δa = da0 + θ da1, δb = db0 + θ db1.
  da0, da1 = x_a, -a_n
  db0, db1 = x_b - n_b, n_b

  def gram_a(x, y):
    return matmul(x.T, row_scale[:, None] * y)

  def gram_b(x, y):
    return matmul(x * col_scale[None, :], y.T)

  cross_a = gram_a(da0, da1)
  cross_b = gram_b(db0, db1)
  # A(θ) = Σ_k θ^k alpha[k], B(θ) = Σ_k θ^k beta[k].
  alpha = (gram_a(da0, da0), cross_a + cross_a.T, gram_a(da1, da1))
  beta = (gram_b(db0, db0), cross_b + cross_b.T, gram_b(db1, db1))
  # Coefficient k of tr(A B) = Σ_{i+j=k} tr(alpha[i] beta[j]).
  coefficients = jnp.stack([
      sum(jnp.sum(alpha[i] * beta[k - i]) for i in range(3) if 0 <= k - i <= 2)
      for k in range(5)
  ])
  c1, c2, c3, c4 = coefficients[1:]
  roots = _cubic_roots(4.0 * c4, 3.0 * c3, 2.0 * c2, c1)
  # The quartic is non-negative; near-ties are only rounding-level ones.
  return _argmin_on_unit_interval(
      coefficients, roots, absolute=False,
      relative_tolerance=8.0 * jnp.finfo(coefficients.dtype).eps)


def _quadratic_roots(c2: jax.Array, c1: jax.Array, c0: jax.Array) -> jax.Array:
  """The two roots of ``c2 t² + c1 t + c0`` (real parts; linear if c2 ≈ 0).

  A negative discriminant is clamped to 0, which gives the vertex: still the
  right candidate when the caller minimizes a polynomial's value.
  """
  scale = jnp.abs(c2) + jnp.abs(c1) + jnp.abs(c0)
  tiny = jnp.finfo(c0.dtype).tiny
  quadratic = jnp.abs(c2) > 1e-6 * scale + tiny
  sqrt_disc = jnp.sqrt(jnp.maximum(c1 * c1 - 4.0 * c2 * c0, 0.0))
  safe_c2 = jnp.where(quadratic, c2, 1.0)
  safe_c1 = jnp.where(jnp.abs(c1) > tiny, c1, 1.0)
  roots_quadratic = jnp.stack(
      [(-c1 - sqrt_disc) / (2.0 * safe_c2), (-c1 + sqrt_disc) / (2.0 * safe_c2)]
  )
  root_linear = -c0 / safe_c1
  return jnp.where(quadratic, roots_quadratic, jnp.stack([root_linear, root_linear]))


def _cubic_roots(
    c3: jax.Array, c2: jax.Array, c1: jax.Array, c0: jax.Array
) -> jax.Array:
  """Three candidates for the real roots of ``c3 t³ + c2 t² + c1 t + c0``.

  Closed form in real arithmetic (no ``eig``): the depressed cubic
  ``s³ + P s + Q`` (``t = s − c2/(3 c3)``) has three real roots
  ``2m cos(φ − 2πk/3)``, ``m = √(−P/3)``, ``cos 3φ = −Q/(2m³)`` when its
  discriminant ``(Q/2)² + (P/3)³`` is ≤ 0, and otherwise the single real root
  ``w − P/(3w)``, ``w = ∛(−Q/2 − sign(Q)·√disc)`` (the sign avoids
  cancellation), returned three times. Falls back to the quadratic roots
  (plus one repeat) when ``c3`` is negligible.
  """
  scale = jnp.abs(c3) + jnp.abs(c2) + jnp.abs(c1) + jnp.abs(c0)
  tiny = jnp.finfo(c0.dtype).tiny
  cubic = jnp.abs(c3) > 1e-6 * scale + tiny
  safe_c3 = jnp.where(cubic, c3, 1.0)
  b, c, d = c2 / safe_c3, c1 / safe_c3, c0 / safe_c3
  p = c - b * b / 3.0
  q = 2.0 * b**3 / 27.0 - b * c / 3.0 + d
  discriminant = (q / 2.0) ** 2 + (p / 3.0) ** 3
  # Three real roots (then P ≤ 0).
  m = jnp.sqrt(jnp.maximum(-p / 3.0, 0.0))
  safe_m = jnp.where(m > 0, m, 1.0)
  phi = jnp.arccos(jnp.clip(-q / (2.0 * safe_m**3), -1.0, 1.0)) / 3.0
  k = jnp.arange(3, dtype=c0.dtype)
  three = 2.0 * m * jnp.cos(phi - 2.0 * jnp.pi * k / 3.0)
  # One real root.
  w = jnp.cbrt(-q / 2.0 - jnp.where(q >= 0, 1.0, -1.0) * jnp.sqrt(jnp.maximum(discriminant, 0.0)))
  safe_w = jnp.where(w != 0, w, 1.0)
  one = jnp.where(w != 0, w - p / (3.0 * safe_w), 0.0)
  roots_cubic = jnp.where(discriminant > 0, jnp.stack([one, one, one]), three) - b / 3.0
  quadratic = _quadratic_roots(c2, c1, c0)
  roots_quadratic = jnp.concatenate([quadratic, quadratic[:1]])
  return jnp.where(cubic, roots_cubic, roots_quadratic)


def _argmin_on_unit_interval(
    coefficients: jax.Array,
    roots: jax.Array,
    *,
    absolute: bool,
    relative_tolerance: float,
) -> jax.Array:
  """θ ∈ [0, 1] minimizing ``Σ_k coefficients[k] θ^k`` (or its absolute value).

  The candidates are the clipped ``roots``, 0, 1 and ½; values within
  ``relative_tolerance · Σ|coefficients|`` of the minimum count as ties, and
  ties go to the candidate closest to ½.
  """
  dtype = coefficients.dtype
  roots = jnp.where(jnp.isfinite(roots), roots, 0.5)
  candidates = jnp.concatenate(
      [jnp.clip(roots, 0.0, 1.0), jnp.asarray([0.0, 1.0, 0.5], dtype)]
  )
  powers = candidates[:, None] ** jnp.arange(coefficients.shape[0], dtype=dtype)
  values = jnp.sum(powers * coefficients, axis=1)
  if absolute:
    values = jnp.abs(values)
  tiny = jnp.finfo(dtype).tiny
  tolerance = relative_tolerance * jnp.sum(jnp.abs(coefficients)) + tiny
  best = jnp.min(values)
  distance = jnp.where(values <= best + tolerance, jnp.abs(candidates - 0.5), jnp.inf)
  return candidates[jnp.argmin(distance)]


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
    tie_breaker: TieBreaker = "imbalance",
    pseudo_inverse: bool = False,
) -> FactorStep:
  """Closed-form AdaPreLoRA step of one pair, with diagnostics.

  See :func:`factor_update` for the maths. ``damping_floor`` is given in units
  of a squared factor norm per rank component: the floor added to ``S_a`` is
  ``damping_floor · mean(p)`` and to ``S_b`` is ``damping_floor · mean(q)``, so
  it does not depend on how the Kronecker scale is split between ``p`` and
  ``q`` (``H`` is unchanged by ``(αp, q/α)``).

  All inputs must be 2-D (a single pair) and of a floating dtype; the result is
  in :func:`compute_dtype` of the inputs.
  """
  dtype = compute_dtype(lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)
  a, b, g_a, g_b, p, q = (
      x.astype(dtype) for x in (lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)
  )
  # S_a = aᵀ diag(p) a, S_b = b diag(q) bᵀ, K = aᵀ g_a (= g_b bᵀ): DESIGN.md §3.
  gram_a = matmul(a.T, p[:, None] * a)
  gram_b = matmul(b * q[None, :], b.T)
  shared = matmul(a.T, g_a)
  inverse_a = psd_inverse(
      gram_a,
      damping=damping,
      damping_floor=damping_floor * jnp.mean(p),
      pseudo_inverse=pseudo_inverse,
  )
  inverse_b = psd_inverse(
      gram_b,
      damping=damping,
      damping_floor=damping_floor * jnp.mean(q),
      pseudo_inverse=pseudo_inverse,
  )
  # δa = (g_a/p − θ a S_a⁻¹ K) S_b⁻¹,  δb = S_a⁻¹ (g_b/q − (1−θ) K S_b⁻¹ b)
  #    = X_a − θ·aN,                   = X_b − (1−θ)·Nb,   N = S_a⁻¹ K S_b⁻¹.
  x_a = matmul(g_a / p[:, None], inverse_b)
  x_b = matmul(inverse_a, g_b / q[None, :])
  core = matmul(matmul(inverse_a, shared), inverse_b)
  a_n = matmul(a, core)
  n_b = matmul(core, b)
  # DESIGN.md §4: u = tr(g_aᵀ diag(1/p) g_a S_b⁻¹) = ⟨g_a, X_a⟩,
  # v = tr(S_a⁻¹ g_b diag(1/q) g_bᵀ) = ⟨g_b, X_b⟩, w = tr(S_a⁻¹ K S_b⁻¹ Kᵀ).
  imbalance_u = jnp.sum(g_a * x_a)
  imbalance_v = jnp.sum(g_b * x_b)
  shared_w = jnp.sum(core * shared)
  theta = _select_theta(
      tie_breaker, imbalance_u, imbalance_v, shared_w, x_a, a_n, x_b, n_b, p, q
  )
  delta_a = x_a - theta * a_n
  delta_b = x_b - (1.0 - theta) * n_b
  # ⟨G, δW⟩ = ⟨g_a, δa⟩ + ⟨g_b, δb⟩ = u + v − w for every θ.
  descent = imbalance_u + imbalance_v - shared_w
  return FactorStep(delta_a, delta_b, theta, descent)


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
      ("lora_a", lora_a), ("lora_b", lora_b), ("grad_a", grad_a),
      ("grad_b", grad_b), ("row_scale", row_scale), ("col_scale", col_scale),
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
    tie_breaker: TieBreaker = "imbalance",
) -> tuple[jax.Array, jax.Array]:
  r"""The AdaPreLoRA closed-form factor update (DESIGN.md §3).

  Returns the factor directions ``(δa, δb)`` whose induced weight change
  ``δW = δa @ b + a @ δb`` is the H-orthogonal projection of the
  Adafactor-preconditioned full-weight step ``H⁻¹G`` onto the tangent space
  ``{X b + a Y}`` of the rank-r factorization, with
  ``H[X] = diag(p) X diag(q)``. With ``S_a = aᵀ diag(p) a``,
  ``S_b = b diag(q) bᵀ`` and ``K = aᵀ g_a``::

    δa = (g_a / p − θ · a S_a⁻¹ K) S_b⁻¹
    δb = S_a⁻¹ (g_b / q − (1 − θ) · K S_b⁻¹ b)

  Every θ gives the same ``δW``; θ (the gauge) is chosen by ``tie_breaker``.
  Like optax ``scale_by_*`` transforms the result has the sign of the gradient
  (a descent step is ``a − η δa``).

  With ``damping == damping_floor == 0`` the inverses are eigh-based
  pseudo-inverses and the result is exact, including rank-deficient factors
  and ``lora_b = 0`` (then ``δa = 0`` and ``δb = S_a⁻¹ g_b / q``). With
  damping, ``S + (damping · tr(S)/r + floor) I`` is inverted by Cholesky.

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
    tie_breaker: ``"imbalance"`` (default; the paper's rule as read in
      DESIGN.md §4: balance the H-norms of ``δa @ b`` and ``a @ δb``, θ clipped
      to [0, 1]), ``"half"`` (θ = ½), ``"factor_norm"`` (balance
      ``Σ p_i δa_ik²`` against ``Σ q_j δb_kj²``) or ``"second_order"``
      (θ ∈ [0, 1] minimizing ``‖δa δb‖_H``, the only part of a finite step's
      weight change that θ affects; measured in ``experiments/tiebreak_bias.py``).

  Returns:
    ``(delta_a, delta_b)`` with the shapes and dtypes of ``lora_a``, ``lora_b``.

  References:
    Bian, Cai, Liu, `AdaPreLoRA: adaptive preconditioned low-rank adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.
  """
  _check_pair_shapes(lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)
  if tie_breaker not in TIE_BREAKERS:
    raise ValueError(
        f"tie_breaker must be one of {TIE_BREAKERS}, got {tie_breaker!r}."
    )
  exact = _is_concrete_zero(damping) and _is_concrete_zero(damping_floor)
  delta_a, delta_b = _mapped_factor_update(
      lora_a, lora_b, grad_a, grad_b, row_scale, col_scale, damping,
      damping_floor, tie_breaker=tie_breaker, pseudo_inverse=exact)
  return delta_a.astype(lora_a.dtype), delta_b.astype(lora_b.dtype)


@functools.partial(jax.jit, static_argnames=("tie_breaker", "pseudo_inverse"))
def _mapped_factor_update(lora_a, lora_b, grad_a, grad_b, row_scale, col_scale,
                          damping, damping_floor, *, tie_breaker, pseudo_inverse):
  """:func:`factor_step` mapped over the leading (layer) axes."""

  def single(a, b, g_a, g_b, p, q):
    step = factor_step(
        a, b, g_a, g_b, p, q, damping=damping, damping_floor=damping_floor,
        tie_breaker=tie_breaker, pseudo_inverse=pseudo_inverse)
    return step.delta_a, step.delta_b

  for _ in range(lora_a.ndim - 2):
    single = jax.vmap(single)
  return single(lora_a, lora_b, grad_a, grad_b, row_scale, col_scale)


def _is_concrete_zero(value: jax.typing.ArrayLike) -> bool:
  try:
    return float(value) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


def tangent_gradient_statistics(
    lora_a: jax.Array,
    lora_b: jax.Array,
    grad_a: jax.Array,
    grad_b: jax.Array,
    *,
    damping: jax.typing.ArrayLike,
    damping_floor: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""Row and column means of ``Ĝ²`` for the tangent estimate of ``G``.

  ``Ĝ = P_a G + G P_b − P_a G P_b`` is the Euclidean projection of ``G`` onto
  the tangent space (DESIGN.md §5, ``"tangent"`` mode), with
  ``P_a = a (aᵀa)⁻¹ aᵀ`` and ``P_b = bᵀ (b bᵀ)⁻¹ b``. In terms of the factor
  gradients ``g_a = G bᵀ``, ``g_b = aᵀ G`` (with ``Ψ_a = (aᵀa)⁻¹``,
  ``Ψ_b = (bbᵀ)⁻¹``, ``K = aᵀ g_a``) it is a rank-2r product::

    Ĝ = U W,   U = [a, g_a] (d_in, 2r),   W = [Ψ_a (g_b − K Ψ_b b); Ψ_b b] (2r, d_out)

  so ``Σ_j Ĝ_ij² = u_i (W Wᵀ) u_iᵀ`` and ``Σ_i Ĝ_ij² = w_jᵀ (UᵀU) w_j``, in
  O((d_in + d_out) r²), never forming ``Ĝ``. Both are squared norms of rows
  and columns of the reconstructed ``Ĝ``, hence non-negative for *any* pair of
  factor gradients: gradients that are not exactly those of one ``G`` (a
  per-leaf transform earlier in an ``optax.chain``, noise, rounding) cannot
  drive a statistic to zero, which would make ``H⁻¹`` explode on that row.
  Inverses are damped as in :func:`psd_inverse` (the floor is in units of a
  squared factor norm).

  Returns:
    ``(row_mean_sq (d_in,), col_mean_sq (d_out,))``, in float32 or wider.
  """
  dtype = compute_dtype(lora_a, lora_b, grad_a, grad_b)
  a, b, g_a, g_b = (x.astype(dtype) for x in (lora_a, lora_b, grad_a, grad_b))
  d_in, d_out = a.shape[0], b.shape[1]
  inverse_a = psd_inverse(matmul(a.T, a), damping=damping, damping_floor=damping_floor)
  inverse_b = psd_inverse(matmul(b, b.T), damping=damping, damping_floor=damping_floor)
  coefficient_b = matmul(inverse_b, b)
  coefficient_a = matmul(inverse_a, g_b - matmul(matmul(a.T, g_a), coefficient_b))
  left = jnp.concatenate([a, g_a], axis=1)
  right = jnp.concatenate([coefficient_a, coefficient_b], axis=0)
  row_sums = jnp.sum(matmul(left, matmul(right, right.T)) * left, axis=1)
  col_sums = jnp.sum(matmul(matmul(left.T, left), right) * right, axis=0)
  # Rounding alone can take a quadratic form of a PSD matrix below zero.
  return jnp.maximum(row_sums, 0.0) / d_out, jnp.maximum(col_sums, 0.0) / d_in


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
