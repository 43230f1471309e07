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
"""Riemannian preconditioned LoRA: scaled GD and scaled AdamW.

Zhang and Pilanci (2024) precondition each factor's gradient by the inverse
r×r Gram matrix of the other factor, the ScaledGD preconditioner of low-rank
matrix estimation. In the flax layout (``ΔW = a @ b``; the paper's
``W = B A`` has ``A = aᵀ``, ``B = bᵀ``, so its ``BᵀB`` is ``b bᵀ`` here and
its ``AAᵀ`` is ``aᵀ a``)::

  ĝ_a = g_a (b bᵀ + reg·I)⁻¹,     ĝ_b = (aᵀ a + reg·I)⁻¹ g_b.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import tracking
from adaprelora_jax._src import validation
from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.engine import factorwise
from adaprelora_jax._src.engine import pairwise
from adaprelora_jax._src.engine import routing
from adaprelora_jax._src.maths import linalg
from adaprelora_jax._src.maths import pair_io


class ScaleByRiemannianPreconditionerState(NamedTuple):
  """State of :func:`scale_by_riemannian_preconditioner`.

  Attributes:
    count: number of updates so far (int32).
    bookkeeping: the pairwise engine's
      (:class:`adaprelora_jax._src.engine.pairwise.Bookkeeping`: each pair's place in
      its group, the state layout version).
  """

  count: chex.Array
  bookkeeping: pairwise.Bookkeeping


def _regularized_inverse(gram: jax.Array, reg: jax.typing.ArrayLike) -> jax.Array:
  # eigh rather than a general inverse: the Gram matrix is PSD, so with its
  # (rounding-negative) eigenvalues clamped, λ + reg > 0 always and the
  # inverse cannot fail even for a rank-deficient or zero factor.
  eigenvalues, eigenvectors = linalg.psd_eigh(gram)
  return linalg.spectral_matrix(1.0 / (eigenvalues + reg), eigenvectors)


def _preconditioned_gradients(
  reg: jax.typing.ArrayLike,
  pair: pair_io.PairInputs,
  state: None,
  count: jax.Array,
  total: None,
) -> pair_io.KernelResult:
  """The pairwise kernel: each factor's gradient times the other's inverse Gram."""
  del state, count, total
  a, b, g_a, g_b = pair.promoted()
  preconditioned_a = linalg.matmul(g_a, _regularized_inverse(linalg.matmul(b, b.T), reg))
  preconditioned_b = linalg.matmul(_regularized_inverse(linalg.matmul(a.T, a), reg), g_b)
  return pair_io.KernelResult(preconditioned_a, preconditioned_b, None, {})


def scale_by_riemannian_preconditioner(
  reg: jax.typing.ArrayLike = 1e-6,
  *,
  pairing: pairing_lib.Pairing = "nnx",
) -> optax.GradientTransformationExtraArgs:
  r"""Precondition each LoRA factor's gradient by the other factor's Gram.

  For every pair (flax layout ``ΔW = a @ b``)::

    ĝ_a = g_a (b bᵀ + reg·I)⁻¹,     ĝ_b = (aᵀ a + reg·I)⁻¹ g_b,

  the r×r ScaledGD preconditioner (paper: ``(BᵀB + δI)⁻¹ ∇_A``,
  ``∇_B (AAᵀ + δI)⁻¹``), both Grams taken from the current factors. With
  ``reg → 0`` the induced weight step ``ĝ_a b + a ĝ_b = G P_b + P_a G``
  (``P`` the orthogonal projectors onto the factors' row/column spaces)
  depends only on ``W``, not on the factorization: the step is invariant
  under ``(a, b) → (a S, S⁻¹ b)`` for every invertible ``S``. ``reg`` breaks
  this slightly and bounds the step at ``lora_b = 0`` (where ``g_a = 0``
  anyway): there ``(b bᵀ + reg I)⁻¹ = I/reg``, so right after LoRA's zero
  init a tiny ``b`` amplifies ``g_a`` by up to ``1/reg``.

  Gram matrices and inverses are computed in float32 (or wider) via ``eigh``.
  Same-shaped pairs share one ``jax.vmap``. The transform owns the LoRA
  factors and their statistics probes (zero updates) and raises, naming
  them, for other leaves (the aliases route those to their ``non_lora``
  transform).

  Args:
    reg: ``δ`` added to both Gram matrices (absolute, as in the paper;
      its good value is strongly task-dependent, the reference tables use
      1e-7 … 100); must be > 0.
    pairing: ``"nnx"``, ``"peft"`` or a pairing callable (see
      :func:`adaprelora_jax.plan_pairs`).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (which
      values are checked: :doc:`/usage`, Policies).

  References:
    Zhang and Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.

    Tong, Ma, Chi, `Accelerating Ill-Conditioned Low-Rank Matrix Estimation
    via Scaled Gradient Descent <https://arxiv.org/abs/2005.08898>`_, JMLR 2021.
  """
  validation.check_positive("reg", reg)
  finder = routing.PairFinder.create("scale_by_riemannian_preconditioner", pairing)
  precondition = functools.partial(_preconditioned_gradients, reg)

  def init_fn(params):
    plan, labels = finder.find(params)
    return ScaleByRiemannianPreconditionerState(
      count=jnp.zeros([], jnp.int32), bookkeeping=pairwise.init_bookkeeping(plan, labels)
    )

  def update_fn(updates, state, params):
    plan, labels = finder.find(params)
    step = pairwise.update_pairs(precondition, plan, labels, updates, params, state)
    return step.updates, state._replace(count=optax.safe_increment(state.count)), step.metrics

  return pairwise.transformation(init_fn, update_fn, metrics=False)


def scaled_gd(
  learning_rate: optax.ScalarOrSchedule,
  reg: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | None = None,
  *,
  pairing: pairing_lib.Pairing = "nnx",
  non_lora: optax.GradientTransformation | None = None,
  strict: bool = False,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Scaled GD for LoRA (Riemannian preconditioned SGD).

  ``a ← a − η (g_a (b bᵀ + reg I)⁻¹ + λ_wd a)``,
  ``b ← b − η ((aᵀa + reg I)⁻¹ g_b + λ_wd b)``, both preconditioners from the
  factors before the step (:func:`scale_by_riemannian_preconditioner`), then
  decoupled weight decay and the learning rate. Without weight decay and with
  ``reg → 0`` the weight update is invariant under ``(a, b) → (a S, S⁻¹ b)``.

  Differences from the reference code (``SGDr`` in
  ``pilancilab/Riemannian_Preconditioned_LoRA``): the reference inverts with
  ``torch.inverse`` and falls back to the raw gradient if that fails; the
  ``eigh`` inverse here cannot fail for ``reg > 0``. Leaves that are not LoRA
  factors use ``non_lora`` (default Adam) instead of plain SGD.

  Args:
    learning_rate: a float or an optax schedule.
    reg: see :func:`scale_by_riemannian_preconditioner`.
    weight_decay: decoupled weight decay (multiplied by the learning rate);
      must be >= 0.
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    pairing: see :func:`scale_by_riemannian_preconditioner`.
    non_lora: transform for leaves that are not LoRA factors, routed by
      ``optax.partition`` (:func:`adaprelora_jax.lora_labels`); default
      ``optax.scale_by_adam()``.
    strict: raise, naming them, if the params contain leaves that are not
      LoRA factors.
    metrics: record the factor metrics of the step before the learning rate
      (:func:`adaprelora_jax.track_step_metrics`), for
      :func:`adaprelora_jax.step_metrics`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (which
      values are checked: :doc:`/usage`, Policies).

  References:
    Zhang and Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  # reg is checked by scale_by_riemannian_preconditioner.
  validation.check_positive("weight_decay", weight_decay, allow_zero=True)
  return optax.chain(
    routing.partition_non_lora(
      scale_by_riemannian_preconditioner(reg, pairing=pairing),
      pairing=pairing,
      non_lora=non_lora,
      strict=strict,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    *([tracking.track_step_metrics(pairing=pairing)] if metrics else []),
    optax.scale_by_learning_rate(learning_rate),
  )


def scaled_adamw(
  learning_rate: optax.ScalarOrSchedule,
  reg: jax.typing.ArrayLike = 1e-6,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  eps_root: jax.typing.ArrayLike = 0.0,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | None = None,
  *,
  pairing: pairing_lib.Pairing = "nnx",
  non_lora: optax.GradientTransformation | None = None,
  strict: bool = False,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Scaled AdamW for LoRA (Riemannian preconditioned AdamW).

  Each factor's gradient is preconditioned by the other factor's regularized
  inverse Gram matrix (:func:`scale_by_riemannian_preconditioner`, both from
  the factors before the step), then AdamW runs on the preconditioned
  gradients (``optax.scale_by_adam`` per factor, float32 moments, decoupled
  weight decay)::

    ĝ_a = g_a (b bᵀ + reg I)⁻¹,   a ← a − η (Adam(ĝ_a) + λ_wd a)
    ĝ_b = (aᵀa + reg I)⁻¹ g_b,    b ← b − η (Adam(ĝ_b) + λ_wd b)

  The element-wise Adam scaling makes the step depend on the factorization:
  unlike scaled GD it is not transformation-invariant.

  Differences from the reference code (``AdamWr`` in
  ``pilancilab/Riemannian_Preconditioned_LoRA``, Mistral-7B version):

  * The reference updates ``A`` in place before computing ``B``'s
    preconditioner from ``c1 = p1.data``, which aliases the *updated* ``A``;
    the paper's equations (followed here) use the factors before the step.
  * The reference defaults to ``correct_bias=False`` (its GPT-2 version to
    True); optax's Adam is bias-corrected.
  * With bias correction the reference adds ``eps`` to ``√v`` *before*
    applying its bias-corrected step size ``η √(1 − β₂ᵗ) / (1 − β₁ᵗ)``, which
    is ``η m̂ / (√v̂ + eps / √(1 − β₂ᵗ))``: its effective ``eps`` is
    ``1 / √(1 − β₂ᵗ)`` times optax's, ≈ 31.6× at the first step for
    ``β₂ = 0.999``, 1.26× after 1000 steps. Here, as in optax, ``eps`` is
    added to ``√v̂`` after bias correction; the two agree once ``β₂ᵗ ≈ 0``.
  * The reference applies weight decay after the step to the updated factor,
    ``p ← (1 − ηλ)(p − η u)``; here it is decoupled, ``p ← p − η(u + λp)``
    (equal to first order in ``η``).
  * The reference's GPT-2 script splits its merged q/v LoRA factors into two
    halves with separate preconditioners; here every pair has one (declare
    the two projections as two pairs to get the split).
  * ``torch.inverse`` with an identity fallback is replaced by an ``eigh``
    inverse that cannot fail for ``reg > 0``.

  Args:
    learning_rate: a float or an optax schedule.
    reg: see :func:`scale_by_riemannian_preconditioner`.
    b1: Adam's first-moment decay; must be in [0, 1).
    b2: Adam's second-moment decay; must be in [0, 1).
    eps: added to the denominator, outside the square root (reference 1e-6);
      must be >= 0.
    eps_root: added to the second moment inside the square root; must be
      >= 0.
    weight_decay: decoupled weight decay (multiplied by the learning rate);
      must be >= 0.
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    pairing: see :func:`scale_by_riemannian_preconditioner`.
    non_lora: transform for leaves that are not LoRA factors, routed by
      ``optax.partition`` (:func:`adaprelora_jax.lora_labels`); default
      ``optax.scale_by_adam()``.
    strict: raise, naming them, if the params contain leaves that are not
      LoRA factors.
    metrics: record the factor metrics of the step before the learning rate
      (:func:`adaprelora_jax.track_step_metrics`), for
      :func:`adaprelora_jax.step_metrics`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (which
      values are checked: :doc:`/usage`, Policies).

  References:
    Zhang and Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  # reg is checked by scale_by_riemannian_preconditioner.
  validation.check_in_range("b1", b1, 0.0, 1.0)
  validation.check_in_range("b2", b2, 0.0, 1.0)
  validation.check_positive("eps", eps, allow_zero=True)
  validation.check_positive("eps_root", eps_root, allow_zero=True)
  validation.check_positive("weight_decay", weight_decay, allow_zero=True)
  return optax.chain(
    routing.partition_non_lora(
      optax.chain(
        scale_by_riemannian_preconditioner(reg, pairing=pairing),
        factorwise.factorwise_transform(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
          finder=routing.PairFinder.create("scaled_adamw", pairing),
        ),
      ),
      pairing=pairing,
      non_lora=non_lora,
      strict=strict,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    *([tracking.track_step_metrics(pairing=pairing)] if metrics else []),
    optax.scale_by_learning_rate(learning_rate),
  )
