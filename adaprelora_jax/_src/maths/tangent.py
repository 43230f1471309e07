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
"""The tangent-space geometry of one LoRA pair: Grams, projection, statistics.

For a pair ``ΔW = a @ b`` (flax layout ``a: (d_in, r)``, ``b: (r, d_out)``)
and its factor gradients ``g_a``, ``g_b``, this module computes the pieces the
closed-form step (:mod:`adaprelora_jax._src.maths.closed_form`) shares: the pair's Gram
matrices, computed once (:func:`pair_grams`, :func:`gram_inverses`); the
Euclidean projection of the factor gradients onto the range of ``J*``
(:func:`consistent_gradients`, ``docs/design.md`` §4), skipped per group of
same-shaped pairs where it is provably the identity; and the tangent
statistics, the row and column means of ``Ĝ²`` for the tangent-space
projection ``Ĝ`` of ``G`` (``docs/design.md`` §5), never forming ``Ĝ``.

All algebra runs in float32 or wider and uses only ops that lower on TPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adaprelora_jax._src.maths import linalg
from adaprelora_jax._src.maths.linalg import compute_dtype
from adaprelora_jax._src.maths.linalg import matmul
from adaprelora_jax._src.maths.linalg import psd_inverse


class PairGrams(NamedTuple):
  """Euclidean r×r products of one pair's factors and factor gradients.

  Computed once per pair (:func:`pair_grams`) and shared by the gradient
  projection, the tangent statistics and the step (``docs/design.md`` §4-§5),
  which would otherwise each recompute them with a pass over the factors.

  Attributes:
    gram_a: ``A = aᵀa`` (r, r).
    gram_b: ``B = b bᵀ`` (r, r).
    cross_a: ``K_a = aᵀ g_a`` (r, r).
    cross_b: ``K_b = g_b bᵀ`` (r, r); equal to ``K_a`` for the factor
      gradients of one ``G``.
    grad_gram_a: ``g_aᵀ g_a`` (r, r), or None where not requested.
    grad_gram_b: ``g_b g_bᵀ`` (r, r), or None where not requested.
    grad_sq_norm: ``‖g_a‖²_F + ‖g_b‖²_F`` (scalar).
  """

  gram_a: jax.Array
  gram_b: jax.Array
  cross_a: jax.Array
  cross_b: jax.Array
  grad_gram_a: jax.Array | None
  grad_gram_b: jax.Array | None
  grad_sq_norm: jax.Array


def pair_grams(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  *,
  gradient_grams: bool = False,
) -> PairGrams:
  """The :class:`PairGrams` of one pair.

  Args:
    lora_a: ``a`` (d_in, r).
    lora_b: ``b`` (r, d_out).
    grad_a: ``g_a`` (d_in, r).
    grad_b: ``g_b`` (r, d_out).
    gradient_grams: also compute ``g_aᵀ g_a`` and ``g_b g_bᵀ`` (needed by the
      tangent statistics).

  Returns:
    The Grams, in :func:`compute_dtype` of the inputs.
  """
  dtype = compute_dtype(lora_a, lora_b, grad_a, grad_b)
  a, b, g_a, g_b = (x.astype(dtype) for x in (lora_a, lora_b, grad_a, grad_b))
  grad_gram_a = grad_gram_b = None
  if gradient_grams:
    grad_gram_a, grad_gram_b = matmul(g_a.T, g_a), matmul(g_b, g_b.T)
    grad_sq_norm = jnp.trace(grad_gram_a) + jnp.trace(grad_gram_b)
  else:
    grad_sq_norm = jnp.sum(g_a * g_a) + jnp.sum(g_b * g_b)
  return PairGrams(
    gram_a=matmul(a.T, a),
    gram_b=matmul(b, b.T),
    cross_a=matmul(a.T, g_a),
    cross_b=matmul(g_b, b.T),
    grad_gram_a=grad_gram_a,
    grad_gram_b=grad_gram_b,
    grad_sq_norm=grad_sq_norm,
  )


class GramInverses(NamedTuple):
  """Damped inverses of the Euclidean Grams (:func:`gram_inverses`).

  Attributes:
    inverse_a: ``Ψ_a = (A + δ_a I)⁻¹`` (r, r).
    inverse_b: ``Ψ_b = (B + δ_b I)⁻¹`` (r, r).
    shift_a: ``δ_a = damping · tr(A)/r + damping_floor``.
    shift_b: ``δ_b``, likewise.
  """

  inverse_a: jax.Array
  inverse_b: jax.Array
  shift_a: jax.Array
  shift_b: jax.Array


def gram_inverses(
  grams: PairGrams,
  *,
  damping: jax.typing.ArrayLike,
  damping_floor: jax.typing.ArrayLike,
) -> GramInverses:
  """Damped inverses of ``aᵀa`` and ``b bᵀ``, as :func:`psd_inverse`.

  ``damping_floor`` is absolute here (the Euclidean metric has unit scales).
  """
  shifts = [
    jnp.trace(gram) * damping / gram.shape[-1] + damping_floor
    for gram in (grams.gram_a, grams.gram_b)
  ]
  inverse_a, inverse_b = (
    psd_inverse(gram, damping=damping, damping_floor=damping_floor)
    for gram in (grams.gram_a, grams.gram_b)
  )
  return GramInverses(inverse_a, inverse_b, *shifts)


# The skip test reads eigenvalue bounds off damped inverses; they are reliable
# only if the damping keeps the Cholesky well conditioned (relative shift at
# least 2⁻¹⁶, i.e. cond ≲ 6.5e4·r, ~1e-2 relative rounding in float32).
_MIN_RELATIVE_SHIFT = 2.0**-16


def _smallest_eigenvalue_bound(gram: jax.Array, inverse: jax.Array, shift: jax.Array) -> jax.Array:
  """A lower bound on ``λ_min(gram)`` from ``inverse = (gram + shift·I)⁻¹``.

  ``λ_max(inverse) ≤ ‖inverse‖_F``, so ``λ_min(gram) ≥ 1/‖inverse‖_F − shift``.
  Minus infinity where ``shift`` is too small for the bound to be trusted.
  """
  r = gram.shape[-1]
  reliable = shift >= _MIN_RELATIVE_SHIFT * jnp.trace(gram) / r
  bound = 1.0 / jnp.sqrt(jnp.sum(inverse * inverse)) - shift
  return jnp.where(reliable, bound, -jnp.inf)


def projection_is_identity(
  grams: PairGrams,
  inverses: GramInverses,
  *,
  tolerance: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Whether :func:`consistent_gradients` would leave the gradients as they are.

  True only if both Grams are numerically full rank (every eigenvalue above
  the cutoff of :func:`adaprelora_jax._src.maths.linalg.numerical_rank_mask`, so the
  range projectors are the identity) and a bound on the gauge correction is
  at most ``tolerance`` relative: with the mismatch ``C = K_a − K_b`` the
  projection moves ``(g_a, g_b)`` by ``(−a Y, Y b)`` with
  ``A Y + Y B = C``, and ``‖(a Y, Y b)‖_F ≤ √(tr A + tr B) ‖C‖_F / (α + β)``
  for lower bounds ``α, β`` on the smallest eigenvalues of ``A, B``
  (:func:`_smallest_eigenvalue_bound`). O(r²) from the Grams and the damped
  inverses; conservative (it may say False for gradients the projection
  would not change, never True for gradients it would change by more).
  Non-finite inputs give False or leave the non-finite entries in place.

  Args:
    grams: the pair's :class:`PairGrams`.
    inverses: their :class:`GramInverses`.
    tolerance: relative change of the gradients (Frobenius norm of the pair)
      below which the projection counts as the identity; default
      ``√eps`` of the Grams' dtype, far below any gradient of no single ``G``
      that matters and far above the rounding of backprop gradients.

  Returns:
    A boolean scalar.
  """
  dtype = grams.gram_a.dtype
  info = jnp.finfo(dtype)
  if tolerance is None:
    tolerance = float(np.sqrt(info.eps))
  lower = [
    _smallest_eigenvalue_bound(gram, inverse, shift)
    for gram, inverse, shift in (
      (grams.gram_a, inverses.inverse_a, inverses.shift_a),
      (grams.gram_b, inverses.inverse_b, inverses.shift_b),
    )
  ]
  traces = [jnp.trace(grams.gram_a), jnp.trace(grams.gram_b)]
  # numerical_rank_mask keeps λ > r·eps·λ_max, and λ_max ≤ tr.
  full_rank = [
    bound > gram.shape[-1] * info.eps * trace
    for bound, gram, trace in zip(lower, (grams.gram_a, grams.gram_b), traces, strict=True)
  ]
  mismatch = jnp.sqrt(jnp.sum(jnp.square(grams.cross_a - grams.cross_b)))
  correction = jnp.sqrt(traces[0] + traces[1]) * mismatch
  small = correction <= tolerance * jnp.sqrt(grams.grad_sq_norm) * (lower[0] + lower[1])
  return full_rank[0] & full_rank[1] & small


def consistent_gradients_from_grams(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  grams: PairGrams,
) -> tuple[jax.Array, jax.Array]:
  """:func:`consistent_gradients` given the pair's :class:`PairGrams`.

  The mismatch ``Uᵀ (K_a Π_b − Π_a K_b) V`` is formed from the r×r Grams, so
  the only passes over the factors are the two that apply the result,
  ``g_a Π_b − a Y`` and ``Π_a g_b + Y b``.

  Returns:
    The projected ``(grad_a, grad_b)``, in :func:`compute_dtype` of the inputs.
  """
  dtype = compute_dtype(lora_a, lora_b, grad_a, grad_b)
  a, b, g_a, g_b = (x.astype(dtype) for x in (lora_a, lora_b, grad_a, grad_b))
  (alpha, u), (beta, v) = linalg.psd_eigh(grams.gram_a), linalg.psd_eigh(grams.gram_b)
  keep_a = linalg.numerical_rank_mask(alpha).astype(dtype)
  keep_b = linalg.numerical_rank_mask(beta).astype(dtype)
  # In the eigenbases: columns of g_a V along β_j = 0 and rows of Uᵀ g_b along
  # α_i = 0 lie in the null space; the range projectors drop them. They are
  # applied by multiplying, not selecting, so a non-finite gradient still
  # makes the result non-finite (0·inf is NaN) and the optimizer's
  # non-finite policy sees it.
  range_a = matmul(u * keep_a[None, :], u.T)
  range_b = matmul(v * keep_b[None, :], v.T)
  mismatch = matmul(matmul(u.T, grams.cross_a), v) * keep_b[None, :] - keep_a[:, None] * matmul(
    matmul(u.T, grams.cross_b), v
  )
  solvable = (keep_a[:, None] > 0) & (keep_b[None, :] > 0)
  denominator = jnp.where(solvable, alpha[:, None] + beta[None, :], 1.0)
  gauge_part = matmul(matmul(u, jnp.where(solvable, mismatch / denominator, 0.0)), v.T)
  return (
    matmul(g_a, range_b) - matmul(a, gauge_part),
    matmul(range_a, g_b) + matmul(gauge_part, b),
  )


def consistent_gradients_unless_identity(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  grams: PairGrams,
  inverses: GramInverses,
  *,
  tolerance: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, PairGrams]:
  """:func:`consistent_gradients`, skipped where it is the identity.

  Backprop gradients are consistent: the projection (two r×r ``eigh`` and two
  passes over the factors per pair) would only move them by rounding. It runs
  unless :func:`projection_is_identity` says it would change them by at most
  ``tolerance`` relative. Under ``jax.vmap`` (the optimizer maps one kernel
  over a group of same-shaped pairs) the decision is taken once for the whole
  group: the projection runs for every member if any member needs it. A
  ``lax.cond`` on a per-pair predicate would become a select there and run
  both branches (``docs/design.md`` §4).

  Args:
    lora_a, lora_b, grad_a, grad_b: the pair (as :func:`consistent_gradients`).
    grams: the pair's :class:`PairGrams`.
    inverses: their :class:`GramInverses`.
    tolerance: see :func:`projection_is_identity`.

  Returns:
    ``(grad_a, grad_b, grams)``: the (possibly) projected gradients, in
    :func:`compute_dtype` of the inputs, and their Grams.
  """
  skip = projection_is_identity(grams, inverses, tolerance=tolerance)
  return _project_unless(skip, lora_a, lora_b, grad_a, grad_b, grams)


def _projected(a, b, g_a, g_b, grams):
  new_a, new_b = consistent_gradients_from_grams(a, b, g_a, g_b, grams)
  fresh = pair_grams(a, b, new_a, new_b, gradient_grams=grams.grad_gram_a is not None)
  # The factors' Grams do not change; reusing them keeps both branches equal
  # in A and B bit for bit.
  return new_a, new_b, fresh._replace(gram_a=grams.gram_a, gram_b=grams.gram_b)


def _kept(a, b, g_a, g_b, grams):
  dtype = compute_dtype(a, b, g_a, g_b)
  return g_a.astype(dtype), g_b.astype(dtype), grams


@jax.custom_batching.custom_vmap
def _project_unless(skip, a, b, g_a, g_b, grams):
  return jax.lax.cond(skip, _kept, _projected, a, b, g_a, g_b, grams)


@_project_unless.def_vmap
def _project_unless_vmap(axis_size, in_batched, skip, *args):
  # One decision for the whole mapped group: a cond on a batched predicate
  # would be lowered to a select of both branches.
  skip_batched, *args_batched = in_batched
  args = jax.tree.map(
    lambda x, batched: x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)),
    list(args),
    args_batched,
  )
  skip_all = jnp.all(skip) if skip_batched else skip
  out = jax.lax.cond(skip_all, jax.vmap(_kept), jax.vmap(_projected), *args)
  return out, jax.tree.map(lambda _: True, out)


def consistent_gradients(
  lora_a: jax.Array, lora_b: jax.Array, grad_a: jax.Array, grad_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
  r"""Euclidean projection of factor gradients onto those of some ``G``.

  Backprop gives factor gradients ``(G bᵀ, aᵀ G)`` of one weight gradient.
  Others (weight decay or noise added before the preconditioner in an
  ``optax.chain``, per-leaf clipping) also have a component in the null space
  of the Jacobian ``J(δa, δb) = δa b + a δb``, which moves no weight: the
  normal equations ``J*HJ d = (g_a, g_b)`` then have no solution, and the
  closed form would amplify that component by ``S_b⁻¹`` (``S_a⁻¹``) without
  bound as ``b`` (``a``) vanishes. Their minimum-norm least-squares solution
  is the solution for the gradients projected onto the orthogonal complement
  of that null space, the range of ``J*`` (``docs/design.md`` §4). For the
  gradients of one ``G`` the projection is the identity: the step is
  unchanged.

  With ``aᵀa = U diag(α) Uᵀ`` and ``b bᵀ = V diag(β) Vᵀ`` the null space is the
  gauge family ``(a X, −X b)`` plus, where a factor is rank-deficient, every
  ``δa`` with ``δa b = 0`` (``δa`` along ``β_j = 0``) and every ``δb`` with
  ``a δb = 0``. These parts are orthogonal, so the projection removes
  ``g_a``'s component along ``β_j = 0`` and ``g_b``'s along ``α_i = 0``, then
  solves the Sylvester equation ``(aᵀa) Y + Y (b bᵀ) = aᵀ g_a − g_b bᵀ`` on the
  remaining directions (``Y = U [T_ij / (α_i + β_j)] Vᵀ``), giving
  ``(g_a Π_b − a Y, Π_a g_b + Y b)`` with ``Π`` the range projectors of the
  Grams. Directions count as null as in
  :func:`adaprelora_jax._src.maths.linalg.numerical_rank_mask`.

  Args:
    lora_a: ``a`` (d_in, r).
    lora_b: ``b`` (r, d_out).
    grad_a: ``g_a`` (d_in, r).
    grad_b: ``g_b`` (r, d_out).

  Returns:
    The projected ``(grad_a, grad_b)``, in :func:`compute_dtype` of the inputs.
  """
  return consistent_gradients_from_grams(
    lora_a, lora_b, grad_a, grad_b, pair_grams(lora_a, lora_b, grad_a, grad_b)
  )


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
  the tangent space (``docs/design.md`` §5, ``"tangent"`` mode), with
  ``P_a = a Ψ_a aᵀ``, ``P_b = bᵀ Ψ_b b``, ``Ψ_a = (aᵀa)⁻¹``, ``Ψ_b = (bbᵀ)⁻¹``,
  computed from the factor gradients ``g_a = G bᵀ``, ``g_b = aᵀ G`` alone
  (:func:`tangent_statistics_from_grams`, which has the formulas). Inverses are
  damped as in :func:`psd_inverse` (the floor is in units of a squared factor
  norm).

  Returns:
    ``(row_mean_sq (d_in,), col_mean_sq (d_out,))``, in float32 or wider.
  """
  grams = pair_grams(lora_a, lora_b, grad_a, grad_b, gradient_grams=True)
  inverses = gram_inverses(grams, damping=damping, damping_floor=damping_floor)
  return tangent_statistics_from_grams(lora_a, lora_b, grad_a, grad_b, grams, inverses)


def _gradient_grams(grams: PairGrams, mode: str) -> tuple[jax.Array, jax.Array]:
  """The gradient Grams ``(g_aᵀ g_a, g_b g_bᵀ)`` of ``grams``, which the statistics need."""
  if grams.grad_gram_a is None or grams.grad_gram_b is None:
    raise ValueError(
      f"{mode} statistics need the gradient Grams: pair_grams(..., gradient_grams=True)."
    )
  return grams.grad_gram_a, grams.grad_gram_b


def tangent_statistics_from_grams(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  grams: PairGrams,
  inverses: GramInverses,
) -> tuple[jax.Array, jax.Array]:
  r""":func:`tangent_gradient_statistics` given the pair's Grams.

  Rows: ``Ĝ = G P_b + P_a G (I − P_b)``, and the rows of the two parts lie
  in the row space of ``b`` and in its orthogonal complement, so with
  ``G P_b = g_a Ψ_b b`` and ``P_a G (I − P_b) = a Ψ_a E_b``,
  ``E_b = g_b − K_b Ψ_b b``::

    Σ_j Ĝ_ij² = g_a,i (Ψ_b B Ψ_b) g_a,iᵀ + a_i (Ψ_a E_b E_bᵀ Ψ_a) a_iᵀ

  Columns likewise from ``Ĝ = P_a G + (I − P_a) G P_b``, ``P_a G = a Ψ_a g_b``,
  ``(I − P_a) G P_b = E_a Ψ_b b``, ``E_a = g_a − a Ψ_a K_a``::

    Σ_i Ĝ_ij² = g_b,jᵀ (Ψ_a A Ψ_a) g_b,j + b_jᵀ (Ψ_b E_aᵀ E_a Ψ_b) b_j

  ``E_b E_bᵀ`` and ``E_aᵀ E_a`` expand into the r×r Grams (``g_b g_bᵀ``,
  ``K_b``, ``B``; ``g_aᵀ g_a``, ``K_a``, ``A``), so besides the Grams each side
  costs two d×r×r products, and ``Ĝ`` is never formed. Every term is a
  quadratic form of a PSD matrix: the statistics are non-negative for *any*
  pair of factor gradients (the rank-r parts cannot cancel a row, which made
  one row of ``H⁻¹`` explode with gradients of no single ``G``); rounding
  below zero is clamped. For the factor gradients of one ``G`` and exact
  inverses this is the row and column sums of ``Ĝ²``; with damped ones
  ``P_a``, ``P_b`` are the damped maps ``a Ψ_a aᵀ``, ``bᵀ Ψ_b b``.

  Args:
    lora_a, lora_b, grad_a, grad_b: the pair (as
      :func:`tangent_gradient_statistics`).
    grams: their :class:`PairGrams`, with the gradient Grams.
    inverses: the damped :class:`GramInverses` of ``grams``.

  Returns:
    ``(row_mean_sq (d_in,), col_mean_sq (d_out,))``, in float32 or wider.

  Raises:
    ValueError: if ``grams`` lacks the gradient Grams.
  """
  grad_gram_a, grad_gram_b = _gradient_grams(grams, "Tangent")
  dtype = compute_dtype(lora_a, lora_b, grad_a, grad_b)
  a, b, g_a, g_b = (x.astype(dtype) for x in (lora_a, lora_b, grad_a, grad_b))
  d_in, d_out = a.shape[0], b.shape[1]
  psi_a, psi_b = inverses.inverse_a, inverses.inverse_b
  gram_a, gram_b, cross_a, cross_b = grams.gram_a, grams.gram_b, grams.cross_a, grams.cross_b
  # E_b E_bᵀ = g_b g_bᵀ − K_b Ψ_b K_bᵀ − (K_b Ψ_b K_bᵀ)ᵀ + K_b Ψ_b B Ψ_b K_bᵀ.
  weighted_b = matmul(cross_b, psi_b)
  overlap_b = matmul(weighted_b, cross_b.T)
  residual_b = (
    grad_gram_b - overlap_b - overlap_b.T + matmul(matmul(weighted_b, gram_b), weighted_b.T)
  )
  # E_aᵀ E_a = g_aᵀ g_a − K_aᵀ Ψ_a K_a − (·)ᵀ + K_aᵀ Ψ_a A Ψ_a K_a.
  weighted_a = matmul(psi_a, cross_a)
  overlap_a = matmul(cross_a.T, weighted_a)
  residual_a = (
    grad_gram_a - overlap_a - overlap_a.T + matmul(matmul(weighted_a.T, gram_a), weighted_a)
  )
  row_grad = matmul(matmul(psi_b, gram_b), psi_b)
  row_factor = matmul(matmul(psi_a, residual_b), psi_a)
  col_grad = matmul(matmul(psi_a, gram_a), psi_a)
  col_factor = matmul(matmul(psi_b, residual_a), psi_b)
  row_sums = jnp.sum(g_a * matmul(g_a, row_grad), axis=1) + jnp.sum(
    a * matmul(a, row_factor), axis=1
  )
  col_sums = jnp.sum(g_b * matmul(col_grad, g_b), axis=0) + jnp.sum(
    b * matmul(col_factor, b), axis=0
  )
  # Rounding alone can take a quadratic form of a PSD matrix below zero.
  return jnp.maximum(row_sums, 0.0) / d_out, jnp.maximum(col_sums, 0.0) / d_in


def surrogate_statistics_from_grams(
  lora_a: jax.Array,
  lora_b: jax.Array,
  grad_a: jax.Array,
  grad_b: jax.Array,
  grams: PairGrams,
) -> tuple[jax.Array, jax.Array]:
  r"""Row and column means of ``G̃²`` for the rank-2r surrogate of ``G``.

  ``G̃ = g_a b + a g_b`` (``docs/design.md`` §5, ``"surrogate"`` mode) is the
  weight-space image ``J(g_a, g_b)`` of the factor gradients, the cheap
  statistic the paper's Algorithm 1 offers beside a backward hook on ``W``
  (second-hand, ``../shared/references/paper-notes.md``). Row ``i`` of ``G̃``
  is ``g_a,i b + a_i g_b``, so with ``B = b bᵀ``, ``K_b = g_b bᵀ`` and
  ``g_b g_bᵀ``::

    Σ_j G̃_ij² = g_a,i B g_a,iᵀ + 2 g_a,i K_bᵀ a_iᵀ + a_i (g_b g_bᵀ) a_iᵀ

  and columns likewise with ``A = aᵀa``, ``K_a = aᵀ g_a`` and ``g_aᵀ g_a``::

    Σ_i G̃_ij² = b_jᵀ (g_aᵀ g_a) b_j + 2 b_jᵀ K_aᵀ g_b,j + g_b,jᵀ A g_b,j

  Three d×r×r products per side after the Grams; ``G̃`` is never formed.
  Unlike the tangent estimate this is not a projection of ``G``: for the
  gradients of one ``G`` it is ``G bᵀb + a aᵀG``, which scales with the
  factors (×c² for ``(c a, c b)``) and is not invariant under the gauge
  ``(a S, S⁻¹ b)``. Each row (column) sum is the squared norm of a row
  (column) of ``G̃``, so it is non-negative; rounding below zero is clamped.

  Args:
    lora_a, lora_b, grad_a, grad_b: the pair (as
      :func:`tangent_gradient_statistics`).
    grams: their :class:`PairGrams`, with the gradient Grams.

  Returns:
    ``(row_mean_sq (d_in,), col_mean_sq (d_out,))``, in float32 or wider.

  Raises:
    ValueError: if ``grams`` lacks the gradient Grams.
  """
  grad_gram_a, grad_gram_b = _gradient_grams(grams, "Surrogate")
  dtype = compute_dtype(lora_a, lora_b, grad_a, grad_b)
  a, b, g_a, g_b = (x.astype(dtype) for x in (lora_a, lora_b, grad_a, grad_b))
  d_in, d_out = a.shape[0], b.shape[1]
  row_sums = jnp.sum(g_a * (matmul(g_a, grams.gram_b) + 2.0 * matmul(a, grams.cross_b)), axis=1)
  row_sums = row_sums + jnp.sum(a * matmul(a, grad_gram_b), axis=1)
  col_sums = jnp.sum(b * (matmul(grad_gram_a, b) + 2.0 * matmul(grams.cross_a.T, g_b)), axis=0)
  col_sums = col_sums + jnp.sum(g_b * matmul(grams.gram_a, g_b), axis=0)
  # Rounding alone can take a sum of squares below zero.
  return jnp.maximum(row_sums, 0.0) / d_out, jnp.maximum(col_sums, 0.0) / d_in


def surrogate_gradient_statistics(
  lora_a: jax.Array, lora_b: jax.Array, grad_a: jax.Array, grad_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Row and column means of ``(g_a b + a g_b)²``, never forming it.

  See :func:`surrogate_statistics_from_grams`, which has the formulas.

  Returns:
    ``(row_mean_sq (d_in,), col_mean_sq (d_out,))``, in float32 or wider.
  """
  grams = pair_grams(lora_a, lora_b, grad_a, grad_b, gradient_grams=True)
  return surrogate_statistics_from_grams(lora_a, lora_b, grad_a, grad_b, grams)
