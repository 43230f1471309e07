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
"""Gauge rules: which factor step of the solution family AdaPreLoRA takes.

The normal equations of the H-weighted least-squares problem fix the weight
change ``δW = δa b + a δb`` but not ``(δa, δb)``: every
``(δa + a X, δb − X b)``, ``X ∈ R^{r×r}``, gives the same ``δW``
(``docs/design.md`` §3-§4). A gauge rule picks one member. Each rule here
maps a :class:`SolutionFamily` to ``(δa, δb, θ)``; :data:`RULES` is the
table the optimizer dispatches on.

* ``"min_imbalance"`` (the paper's rule, the default): the unique member
  minimizing ``‖δa b − a δb‖_H`` over the whole gauge family.
* ``"equal_norms"``: an earlier reading of the paper, not its rule: the
  member of the one-parameter θ-line at which ``‖δa b‖_H = ‖a δb‖_H``,
  θ clipped to [0, 1].
* ``"half"``: θ = ½ on the θ-line.
* ``"factor_norm"``: θ ∈ [0, 1] balancing ``Σ p_i δa_ik²`` against
  ``Σ q_j δb_kj²``.
* ``"second_order"``: θ ∈ [0, 1] minimizing ``‖δa δb‖_H``, the only part of
  a finite step's weight change that the gauge affects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from adaprelora_jax._src import validation
from adaprelora_jax._src.maths.linalg import matmul


class SolutionFamily(NamedTuple):
  """The solutions of one pair's normal equations, in closed form.

  With ``S_a = aᵀ diag(p) a``, ``S_b = b diag(q) bᵀ``, ``K_a = aᵀ g_a`` and
  ``K_b = g_b bᵀ`` (equal for the factor gradients of one ``G``), the θ-line
  of ``docs/design.md`` §3 is ``δa = X_a − θ·a N_a``,
  ``δb = X_b − (1 − θ)·N_a b``, with ``X_a = (g_a / p) S_b⁻¹``,
  ``X_b = S_a⁻¹ (g_b / q)`` and ``N_a = S_a⁻¹ K_a S_b⁻¹``;
  ``N_b = S_a⁻¹ K_b S_b⁻¹``. All inverses are the (damped) ones of the step.

  Attributes:
    lora_a: ``a`` (d_in, r).
    lora_b: ``b`` (r, d_out).
    row_scale: ``p`` (d_in,).
    col_scale: ``q`` (d_out,).
    x_a: ``X_a`` (d_in, r).
    x_b: ``X_b`` (r, d_out).
    core_a: ``N_a`` (r, r).
    core_b: ``N_b`` (r, r).
    u: ``⟨g_a, X_a⟩``.
    v: ``⟨g_b, X_b⟩``.
    w: ``⟨K_a, N_a⟩``.
  """

  lora_a: jax.Array
  lora_b: jax.Array
  row_scale: jax.Array
  col_scale: jax.Array
  x_a: jax.Array
  x_b: jax.Array
  core_a: jax.Array
  core_b: jax.Array
  u: jax.Array
  v: jax.Array
  w: jax.Array

  def member(self, theta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The θ-line member ``(X_a − θ·a N_a, X_b − (1 − θ)·N_a b)``."""
    return (
      self.x_a - theta * matmul(self.lora_a, self.core_a),
      self.x_b - (1.0 - theta) * matmul(self.core_a, self.lora_b),
    )


GaugeRule = Callable[[SolutionFamily], tuple[jax.Array, jax.Array, jax.Array]]


def _on_theta_line(
  select_theta: Callable[[SolutionFamily], jax.Array],
) -> GaugeRule:
  def rule(family: SolutionFamily) -> tuple[jax.Array, jax.Array, jax.Array]:
    theta = select_theta(family)
    return (*family.member(theta), theta)

  rule.__doc__ = select_theta.__doc__
  return rule


def min_imbalance(family: SolutionFamily) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The paper's rule: argmin over all X of ``‖(δa + aX) b − a (δb − Xb)‖²_H``.

  From the θ = 0 member ``(X_a, X_b − N_a b)`` the normal equation
  ``S_a (2X) S_b = −aᵀ diag(p) (δa b − a δb) diag(q) bᵀ`` gives
  ``X* = ½ N_b − N_a``, hence ``δa = X_a − a (N_a − ½ N_b)`` and
  ``δb = X_b − ½ N_b b``. For the factor gradients of one ``G``
  (``N_a = N_b``) this is the θ = ½ member; the general form also covers
  factor gradients that are not (``docs/design.md`` §4). The returned θ is
  ½, the θ-line member it equals in that case. Unique when ``S_a, S_b ≻ 0``.
  """
  correction = family.core_a - 0.5 * family.core_b
  delta_a = family.x_a - matmul(family.lora_a, correction)
  delta_b = family.x_b - 0.5 * matmul(family.core_b, family.lora_b)
  return delta_a, delta_b, jnp.asarray(0.5, family.w.dtype)


def _half_theta(family: SolutionFamily) -> jax.Array:
  """θ = ½ on the θ-line."""
  return jnp.asarray(0.5, family.w.dtype)


def _equal_norms_theta(family: SolutionFamily) -> jax.Array:
  """θ at which ``‖δa b‖_H = ‖a δb‖_H`` on the θ-line, clipped to [0, 1].

  ``‖δa b‖²_H − ‖a δb‖²_H = u − v + w − 2θw`` is linear in θ and vanishes at
  ``θ* = ½ + (u − v)/(2w)``; outside [0, 1] the factor updates grow in
  opposite null-space directions, so θ* is clipped. Not the paper's rule: it
  is not unique over the full gauge family (``docs/design.md`` §4).
  """
  half = jnp.asarray(0.5, family.w.dtype)
  positive = family.w > 0
  safe_w = jnp.where(positive, family.w, 1.0)
  theta = 0.5 + (family.u - family.v) / (2.0 * safe_w)
  return jnp.where(positive, jnp.clip(theta, 0.0, 1.0), half)


def _factor_norm_theta(family: SolutionFamily) -> jax.Array:
  """θ ∈ [0, 1] balancing ``Σ p_i δa_ik²`` against ``Σ q_j δb_kj²``.

  With φ = 1 − θ both are quadratics in θ:
  ``f(θ) = ‖X_a‖²_p − 2θ⟨X_a, aN⟩_p + θ²‖aN‖²_p
  − (‖X_b‖²_q − 2(1−θ)⟨X_b, Nb⟩_q + (1−θ)²‖Nb‖²_q)``; θ minimizes ``|f|``.
  """
  a_n = matmul(family.lora_a, family.core_a)
  n_b = matmul(family.core_a, family.lora_b)
  weighted_a = family.row_scale[:, None]
  weighted_b = family.col_scale[None, :]
  xa_xa = jnp.sum(weighted_a * family.x_a * family.x_a)
  xa_an = jnp.sum(weighted_a * family.x_a * a_n)
  an_an = jnp.sum(weighted_a * a_n * a_n)
  xb_xb = jnp.sum(weighted_b * family.x_b * family.x_b)
  xb_nb = jnp.sum(weighted_b * family.x_b * n_b)
  nb_nb = jnp.sum(weighted_b * n_b * n_b)
  c2 = an_an - nb_nb
  c1 = -2.0 * xa_an - 2.0 * xb_nb + 2.0 * nb_nb
  c0 = xa_xa - xb_xb + 2.0 * xb_nb - nb_nb
  return argmin_on_unit_interval(
    jnp.stack([c0, c1, c2]), quadratic_roots(c2, c1, c0), absolute=True, relative_tolerance=1e-6
  )


def _second_order_theta(family: SolutionFamily) -> jax.Array:
  """θ ∈ [0, 1] minimizing the second-order term ``‖δa(θ) δb(θ)‖²_H``.

  A step of size η moves ``W`` by ``−η δW + η² δa δb``: the first-order part
  is the same for every θ, so the second-order term is the only part of the
  weight update that θ controls. It is a quartic in θ built from r×r Grams:
  ``‖δa δb‖²_H = tr(A(θ) B(θ))`` with ``A = δaᵀ diag(p) δa`` and
  ``B = δb diag(q) δbᵀ``, and with ``δa = X_a − θ·aN``,
  ``δb = (X_b − Nb) + θ·Nb`` both Grams are quadratics in θ. Its minimum on
  [0, 1] is at an endpoint or a real root of the derivative (a cubic, solved
  in closed form). It depends on ``(p, q)`` only through ``H = p ⊗ q`` and is
  invariant under the gauge ``(a S, S⁻¹ b)``.
  """
  a_n = matmul(family.lora_a, family.core_a)
  n_b = matmul(family.core_a, family.lora_b)
  p, q = family.row_scale, family.col_scale
  # δa = da0 + θ da1, δb = db0 + θ db1.
  da0, da1 = family.x_a, -a_n
  db0, db1 = family.x_b - n_b, n_b

  def gram_a(x, y):
    return matmul(x.T, p[:, None] * y)

  def gram_b(x, y):
    return matmul(x * q[None, :], y.T)

  cross_a = gram_a(da0, da1)
  cross_b = gram_b(db0, db1)
  # A(θ) = Σ_k θ^k alpha[k], B(θ) = Σ_k θ^k beta[k].
  alpha = (gram_a(da0, da0), cross_a + cross_a.T, gram_a(da1, da1))
  beta = (gram_b(db0, db0), cross_b + cross_b.T, gram_b(db1, db1))
  # Coefficient k of tr(A B) = Σ_{i+j=k} tr(alpha[i] beta[j]).
  coefficients = jnp.stack(
    [sum(jnp.sum(alpha[i] * beta[k - i]) for i in range(3) if 0 <= k - i <= 2) for k in range(5)]
  )
  c1, c2, c3, c4 = coefficients[1:]
  roots = cubic_roots(4.0 * c4, 3.0 * c3, 2.0 * c2, c1)
  # The quartic is non-negative; near-ties are only rounding-level ones.
  return argmin_on_unit_interval(
    coefficients, roots, absolute=False, relative_tolerance=8.0 * jnp.finfo(coefficients.dtype).eps
  )


RULES: dict[str, GaugeRule] = {
  "min_imbalance": min_imbalance,
  "equal_norms": _on_theta_line(_equal_norms_theta),
  "half": _on_theta_line(_half_theta),
  "factor_norm": _on_theta_line(_factor_norm_theta),
  "second_order": _on_theta_line(_second_order_theta),
}

# Names that once meant another rule: an old config must not silently change.
RENAMED = {
  "imbalance": (
    "tie_breaker='imbalance' (equalize the two contributions' H-norms along "
    "θ) was renamed 'equal_norms'; it is not the paper's rule, which is "
    "'min_imbalance', now the default"
  ),
}


def check_rule(name: str) -> None:
  """Raises ``ValueError`` unless ``name`` is a key of :data:`RULES`."""
  if name in RENAMED:
    raise ValueError(f"{RENAMED[name]}.")
  validation.check_choice("tie_breaker", name, RULES)


def quadratic_roots(c2: jax.Array, c1: jax.Array, c0: jax.Array) -> jax.Array:
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


def cubic_roots(c3: jax.Array, c2: jax.Array, c1: jax.Array, c0: jax.Array) -> jax.Array:
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
  quadratic = quadratic_roots(c2, c1, c0)
  roots_quadratic = jnp.concatenate([quadratic, quadratic[:1]])
  return jnp.where(cubic, roots_cubic, roots_quadratic)


def argmin_on_unit_interval(
  coefficients: jax.Array,
  roots: jax.Array,
  *,
  absolute: bool,
  relative_tolerance: jax.typing.ArrayLike,
) -> jax.Array:
  """θ ∈ [0, 1] minimizing ``Σ_k coefficients[k] θ^k`` (or its absolute value).

  The candidates are the clipped ``roots``, 0, 1 and ½; values within
  ``relative_tolerance · Σ|coefficients|`` of the minimum count as ties, and
  ties go to the candidate closest to ½.
  """
  dtype = coefficients.dtype
  roots = jnp.where(jnp.isfinite(roots), roots, 0.5)
  candidates = jnp.concatenate([jnp.clip(roots, 0.0, 1.0), jnp.asarray([0.0, 1.0, 0.5], dtype)])
  powers = candidates[:, None] ** jnp.arange(coefficients.shape[0], dtype=dtype)
  values = jnp.sum(powers * coefficients, axis=1)
  if absolute:
    values = jnp.abs(values)
  tiny = jnp.finfo(dtype).tiny
  tolerance = jnp.sum(jnp.abs(coefficients)) * relative_tolerance + tiny
  best = jnp.min(values)
  distance = jnp.where(values <= best + tolerance, jnp.abs(candidates - 0.5), jnp.inf)
  return candidates[jnp.argmin(distance)]
