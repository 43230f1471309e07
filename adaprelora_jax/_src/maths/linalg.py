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
"""Small dense linear algebra shared by the LoRA optimizers.

The optimizers work on r×r Gram matrices of the LoRA factors and on tall-skinny
products with them. Everything here runs in the dtype it is given (callers
promote to :func:`compute_dtype`) and uses only ops that lower on TPU
(``eigh``, ``qr``, ``svd``, triangular solves); no ``eig``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

# r×r algebra and the tall-skinny products are cheap next to the model; ask
# for full float32 accuracy (TPUs would otherwise use bf16 passes for f32).
_PRECISION = jax.lax.Precision.HIGHEST


def matmul(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x @ y`` at full (``HIGHEST``) precision."""
  return jnp.matmul(x, y, precision=_PRECISION)


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32, or wider if an input is wider (e.g. float64 under x64)."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in arrays))


def psd_eigh(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigen-decomposition of a symmetric positive semi-definite matrix.

  The input is symmetrized first (Gram products are symmetric only up to
  rounding) and the eigenvalues are clamped at zero (rounding can make those of
  a singular Gram matrix slightly negative).

  Returns:
    ``(eigenvalues, eigenvectors)``, ascending, ``gram = V diag(λ) Vᵀ``.
  """
  eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (gram + gram.T))
  return jnp.maximum(eigenvalues, 0.0), eigenvectors


def spectral_matrix(eigenvalues: jax.Array, eigenvectors: jax.Array) -> jax.Array:
  """``V diag(eigenvalues) Vᵀ``: a function of a symmetric matrix."""
  return matmul(eigenvectors * eigenvalues, eigenvectors.T)


def numerical_rank_mask(eigenvalues: jax.Array) -> jax.Array:
  """Which eigenvalues of a PSD matrix are not rounding noise.

  The cutoff ``r · eps · λ_max`` is ``torch.linalg.pinv``'s default relative
  tolerance; an all-zero matrix has no non-zero eigenvalue.
  """
  size = eigenvalues.shape[-1]
  cutoff = size * jnp.finfo(eigenvalues.dtype).eps * jnp.max(eigenvalues)
  return eigenvalues > cutoff


def damped_pseudo_inverse(
  eigenvalues: jax.Array, eigenvectors: jax.Array, damping: jax.typing.ArrayLike
) -> jax.Array:
  """``(S + δI)⁻¹`` on the numerical range of the PSD matrix ``S``, 0 off it.

  ``S = V diag(λ) Vᵀ`` (from :func:`psd_eigh`). Directions whose eigenvalue is
  rounding noise (:func:`numerical_rank_mask`) are treated as exactly
  singular and get 0, so an all-zero ``S`` (``lora_b`` at LoRA init) gives the
  zero matrix, the Moore-Penrose answer, instead of ``I/δ``.
  """
  keep = numerical_rank_mask(eigenvalues)
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, eigenvalues + damping, 1.0), 0.0)
  return spectral_matrix(inverse, eigenvectors)


def psd_sylvester(
  left: tuple[jax.Array, jax.Array],
  right: tuple[jax.Array, jax.Array],
  rhs: jax.Array,
) -> jax.Array:
  """Solves ``S_l X + X S_r = C`` for symmetric PSD ``S_l``, ``S_r``.

  With ``S_l = U diag(α) Uᵀ`` and ``S_r = V diag(β) Vᵀ`` the equation
  decouples in the eigenbases: ``X = U [(Uᵀ C V)_ij / (α_i + β_j)] Vᵀ``
  (Bartels-Stewart with both Schur forms diagonal), so two ``eigh`` replace the
  complex ``eig`` of the general algorithm. Entries with ``α_i + β_j``
  numerically zero (both matrices singular along those directions) are set
  to 0, the minimum-norm solution.

  Args:
    left: ``(eigenvalues, eigenvectors)`` of ``S_l`` (r_l × r_l).
    right: ``(eigenvalues, eigenvectors)`` of ``S_r`` (r_r × r_r).
    rhs: ``C`` (r_l × r_r).

  Returns:
    ``X`` (r_l × r_r).
  """
  (alpha, u), (beta, v) = left, right
  denominator = alpha[:, None] + beta[None, :]
  size = max(alpha.shape[-1], beta.shape[-1])
  cutoff = size * jnp.finfo(denominator.dtype).eps * jnp.max(denominator)
  solvable = denominator > cutoff
  transformed = matmul(matmul(u.T, rhs), v)
  solution = jnp.where(solvable, transformed / jnp.where(solvable, denominator, 1.0), 0.0)
  return matmul(matmul(u, solution), v.T)


# "auto": the pseudo-inverse where the damping is zero at run time, Cholesky
# of the damped matrix elsewhere (for damping that may be traced).
InverseMode = bool | Literal["auto"]


def psd_inverse(
  gram: jax.Array,
  *,
  damping: jax.typing.ArrayLike = 0.0,
  damping_floor: jax.typing.ArrayLike = 0.0,
  pseudo_inverse: InverseMode = False,
) -> jax.Array:
  """Inverse of a symmetric PSD r×r matrix, damped or pseudo-inverted.

  Args:
    gram: symmetric positive semi-definite matrix (r, r).
    damping: relative Tikhonov damping; ``damping * trace(gram) / r`` is added
      to the diagonal (scale-free, ``docs/design.md`` §3).
    damping_floor: absolute value added to the diagonal on top of the
      relative damping; keeps the inverse bounded when ``gram`` vanishes
      (e.g. ``lora_b = 0`` at LoRA init).
    pseudo_inverse: if True, ignore the damping and return the Moore-Penrose
      pseudo-inverse via ``eigh`` (eigenvalues below ``r·eps·λ_max`` are
      treated as zero). Exact on rank-deficient Gram matrices. If
      ``"auto"``, the pseudo-inverse where the total shift is zero and the
      damped inverse elsewhere, decided at run time (so it is exact at a
      traced damping of zero too).

  Returns:
    The (r, r) inverse.
  """
  if pseudo_inverse is True:
    return damped_pseudo_inverse(*psd_eigh(gram), damping=0.0)
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
  inverse_cholesky = jax.lax.linalg.triangular_solve(cholesky, eye, left_side=True, lower=True)
  damped = matmul(inverse_cholesky.T, inverse_cholesky)
  if pseudo_inverse == "auto":
    # Where the shift is zero the Cholesky of a singular matrix is NaN; the
    # select keeps only the branch that applies.
    exact = damped_pseudo_inverse(*psd_eigh(gram), damping=0.0)
    return jnp.where(shift == 0, exact, damped)
  return damped
