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
"""LoRA-Pro: equivalent-gradient projection (Wang et al., ICLR 2025).

LoRA with factor steps ``(δa, δb)`` moves ``W = W0 + s·a b`` by the
*equivalent gradient* ``g̃ = s (δa b + a δb)`` (to first order). LoRA-Pro picks
the factor steps whose equivalent gradient is closest in Frobenius norm to a
W-space direction, and among those (a family parameterized by an r×r gauge
``X``) the pair closest to the plain factor gradients.

In the paper's layout (``W = B A``, ``A: (r, n)``, ``B: (m, r)``) Theorems 2.1
and 2.2 read, for a direction with factor gradients ``(u_A, u_B)``::

  δA = (1/s²) (BᵀB)⁻¹ u_A + X A
  δB = (1/s²) (I − B (BᵀB)⁻¹ Bᵀ) u_B (AAᵀ)⁻¹ − B X
  (BᵀB) X + X (AAᵀ) = −(1/s²) (BᵀB)⁻¹ u_A Aᵀ

In the flax layout here (``ΔW = a @ b``, ``a = Aᵀ``, ``b = Bᵀ``, so ``BᵀB`` is
``S_b = b bᵀ``, ``AAᵀ`` is ``S_a = aᵀ a`` and the gauge is ``Z = Xᵀ``)::

  δa = (1/s²) u_a P_b + a Z
  δb = (1/s²) P_a u_b (I − bᵀ P_b b) − Z b
  S_a Z + Z S_b = −(1/s²) aᵀ u_a P_b,          P_a = S_a⁻¹, P_b = S_b⁻¹.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

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
from adaprelora_jax._src.engine import slots
from adaprelora_jax._src.maths import linalg
from adaprelora_jax._src.maths import pair_io

LoRAProMode = Literal["efficient", "full"]
MODES: tuple[str, ...] = ("efficient", "full")


class LoRAProPairState(NamedTuple):
  """One pair's ``mode="full"`` state (both None in ``"efficient"`` mode,
  whose factor-space Adam moments live in the
  :class:`adaprelora_jax._src.engine.factorwise.FactorwiseState` that follows in the
  chain).

  Attributes:
    mu: the EMA of the equivalent gradient, (d_in, d_out) (the pair's full
      weight shape, flax layout).
    nu: likewise, the EMA of the squared equivalent gradient.
  """

  mu: Any
  nu: Any


# Both moments at the pair's lora_a, float32 (float64 for float64 parameters).
STORAGE = LoRAProPairState(
  mu=slots.Slot("a", ("d_in", "d_out")), nu=slots.Slot("a", ("d_in", "d_out"))
)


class ScaleByLoRAProState(NamedTuple):
  """State of the pairwise stage of :func:`scale_by_lora_pro`.

  Attributes:
    count: number of updates so far (int32).
    pairs: every pair's :class:`LoRAProPairState`, stored as :data:`STORAGE`
      says (trees like the params).
    bookkeeping: the pairwise engine's
      (:class:`adaprelora_jax._src.engine.pairwise.Bookkeeping`).
  """

  count: chex.Array
  pairs: LoRAProPairState
  bookkeeping: pairwise.Bookkeeping


class _Projection(NamedTuple):
  """LoRA-Pro's projection at one pair ``(a, b)`` (module docstring)."""

  lora_a: jax.Array
  lora_b: jax.Array
  eigen_a: tuple[jax.Array, jax.Array]
  eigen_b: tuple[jax.Array, jax.Array]
  inverse_a: jax.Array
  inverse_b: jax.Array
  inverse_scale_sq: jax.typing.ArrayLike

  @classmethod
  def at(cls, a, b, *, damping, lora_scale) -> _Projection:
    # One eigh per Gram gives both its damped inverse and its part of the
    # Sylvester solve.
    eigen_a = linalg.psd_eigh(linalg.matmul(a.T, a))
    eigen_b = linalg.psd_eigh(linalg.matmul(b, b.T))
    return cls(
      a,
      b,
      eigen_a,
      eigen_b,
      linalg.damped_pseudo_inverse(*eigen_a, damping),
      linalg.damped_pseudo_inverse(*eigen_b, damping),
      1.0 / lora_scale**2,
    )

  def without_gauge(self, u_a: jax.Array, u_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Theorem 2.1 with ``X = 0``: ``(u_a P_b, P_a u_b (I − bᵀP_b b)) / s²``."""
    b = self.lora_b
    across_b = linalg.matmul(linalg.matmul(linalg.matmul(u_b, b.T), self.inverse_b), b)
    delta_a = linalg.matmul(u_a, self.inverse_b) * self.inverse_scale_sq
    delta_b = linalg.matmul(self.inverse_a, u_b - across_b) * self.inverse_scale_sq
    return delta_a, delta_b

  def directions(self, u_a: jax.Array, u_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Theorems 2.1 and 2.2: the projection with the Sylvester-optimal gauge."""
    a, b = self.lora_a, self.lora_b
    delta_a, delta_b = self.without_gauge(u_a, u_b)
    rhs = -(linalg.matmul(linalg.matmul(a.T, u_a), self.inverse_b) * self.inverse_scale_sq)
    gauge = linalg.psd_sylvester(self.eigen_a, self.eigen_b, rhs)
    return delta_a + linalg.matmul(a, gauge), delta_b - linalg.matmul(gauge, b)


class _ProHyperparams(NamedTuple):
  b1: jax.typing.ArrayLike
  b2: jax.typing.ArrayLike
  eps: jax.typing.ArrayLike
  eps_root: jax.typing.ArrayLike
  lora_scale: jax.typing.ArrayLike
  damping: jax.typing.ArrayLike


def _projected_gradients(
  damping: jax.typing.ArrayLike,
  lora_scale: jax.typing.ArrayLike,
  pair: pair_io.PairInputs,
  state: LoRAProPairState,
  count: jax.Array,
  total: None,
) -> pair_io.KernelResult:
  """``mode="efficient"``'s kernel: the projected factor gradients."""
  del count, total
  a, b, g_a, g_b = pair.promoted()
  projection = _Projection.at(a, b, damping=damping, lora_scale=lora_scale)
  return pair_io.KernelResult(*projection.directions(g_a, g_b), state, {})


def _full_space_adam(
  hyper: _ProHyperparams,
  pair: pair_io.PairInputs,
  state: LoRAProPairState,
  count: jax.Array,
  total: None,
) -> pair_io.KernelResult:
  """``mode="full"``'s kernel: Adam on the equivalent full-weight gradient."""
  del total
  a, b, g_a, g_b = pair.promoted()
  projection = _Projection.at(a, b, damping=hyper.damping, lora_scale=hyper.lora_scale)
  delta_a, delta_b = projection.without_gauge(g_a, g_b)
  equivalent = hyper.lora_scale * (linalg.matmul(delta_a, b) + linalg.matmul(a, delta_b))
  mu = optax.tree.update_moment(equivalent, state.mu, hyper.b1, 1)
  nu = optax.tree.update_moment_per_elem_norm(equivalent, state.nu, hyper.b2, 2)
  count_inc = optax.safe_increment(count)
  mu_hat = optax.tree.bias_correction(mu, hyper.b1, count_inc)
  nu_hat = optax.tree.bias_correction(nu, hyper.b2, count_inc)
  direction = mu_hat / (jnp.sqrt(nu_hat + hyper.eps_root) + hyper.eps)
  u_a = linalg.matmul(direction, b.T) * hyper.lora_scale
  u_b = linalg.matmul(a.T, direction) * hyper.lora_scale
  return pair_io.KernelResult(*projection.directions(u_a, u_b), LoRAProPairState(mu, nu), {})


def scale_by_lora_pro(
  mode: LoRAProMode = "efficient",
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  *,
  lora_scale: jax.typing.ArrayLike = 1.0,
  damping: jax.typing.ArrayLike = 1e-8,
  pairing: pairing_lib.Pairing = "nnx",
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale LoRA factor gradients with LoRA-Pro's equivalent-gradient projection.

  ``mode="efficient"``: project the factor gradients (module docstring:
  ``(u_a, u_b) = (g_a, g_b)``, Sylvester gauge), then Adam on each factor's
  projected gradient (``optax.scale_by_adam``, float32 moments). State
  ``2 (d_in + d_out) r`` per pair, as AdamW.

  ``mode="full"`` ("AdamW in full space"): form the equivalent gradient of the
  gauge-free projection, ``g̃ = s (δa b + a δb)`` (d_in × d_out; it is the
  projection of ``G`` onto the tangent space of the factorization and does
  not depend on the gauge), run Adam on ``g̃`` with full-size moments
  ``M, V`` (d_in × d_out each, float32), and project the Adam direction ``U``
  back: ``(u_a, u_b) = (s U bᵀ, s aᵀ U)``, Sylvester gauge. State
  ``2 d_in d_out`` per pair, the memory of full fine-tuning, and four
  ``O(d_in d_out r)`` matrix products per step: this mode trades LoRA's
  memory savings for a W-space Adam step.

  The two r×r Gram matrices ``S_a = aᵀa``, ``S_b = b bᵀ`` are decomposed once
  by ``eigh`` (float32 or wider); that gives the damped inverses
  ``P = (S + δI)⁻¹`` and the Sylvester solution
  ``Z = U_a [(U_aᵀ C U_b)_ij / (α_i + β_j)] U_bᵀ`` without ``eig``.

  At LoRA init ``b = 0``: ``S_b = 0`` is singular and the paper's inverses do
  not exist. Directions where a Gram matrix is numerically zero are treated
  by the pseudo-inverse (``P_b = 0`` there), which is the minimum-norm
  solution of the paper's least-squares problem: ``δa = 0`` and
  ``δb = P_a g_b / s²``, finite for every ``g_a``.

  Differences from the reference code (``mrflogs/LoRA-Pro``: ``peta/optim.py``
  and the DeepSpeed ``lorapro_full_adjustment``):

  * The Sylvester equation is solved with ``eigh`` of the two symmetric
    Grams instead of the complex ``torch.linalg.eig`` recipe (TPU-safe;
    same solution), with the same undamped coefficient matrices.
  * The reference inverts ``pinv(S + δI)``, which for ``S = 0`` (``b`` at
    LoRA init) is ``I/δ = 1e8·I``; here directions where ``S`` is
    numerically zero get 0 (above). Elsewhere they agree.
  * The DeepSpeed release has a first-step branch (``ĝ_A = g_A``,
    ``ĝ_B = g_B (AAᵀ)⁻¹ / s²``) that never runs, because ``global_step`` is
    incremented before it is tested (issue #13). We follow the paper's
    equations on every step, with ``b = 0`` handled by the pseudo-inverse;
    since ``g_a = s G bᵀ = 0`` when ``b = 0``, that branch would have given
    the same step.
  * Full mode keeps ``M`` and ``V`` in float32; the reference keeps them in
    bfloat16 (``peta``: both; DeepSpeed: ``V``).
  * The reference's ``X_mode="symmetry"`` and ``"zero"`` gauges are not
    provided (the paper's method is the Sylvester gauge).
  * ``lora_scale`` is an argument (the DeepSpeed release hard-codes 2).

  Args:
    mode: ``"efficient"`` or ``"full"`` (above).
    b1: Adam's first-moment decay; must be in [0, 1).
    b2: Adam's second-moment decay; must be in [0, 1).
    eps: added to the denominator, outside the square root; must be >= 0.
    eps_root: added to the second moment inside the square root; must be
      >= 0.
    lora_scale: the LoRA scale ``s`` of ``W = W0 + s·a b`` (``α/r``, or
      ``α/√r`` for rsLoRA; 1 for ``flax.nnx.LoRA``). LoRA-Pro's projection
      depends on it; it must match the model, and be > 0.
    damping: ``δ`` of ``(S + δI)⁻¹`` (absolute, reference 1e-8); must be
      >= 0.
    pairing: ``"nnx"``, ``"peft"`` or a pairing callable (see
      :func:`adaprelora_jax.plan_pairs`). The transform owns the LoRA
      factors and their statistics probes (zero updates) and raises, naming
      them, for other leaves (the alias routes those to its ``non_lora``
      transform).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (which
      values are checked: :doc:`/usage`, Policies).

  References:
    Wang, Liang, He, Wang, Tan, `LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized? <https://arxiv.org/abs/2407.18242>`_, ICLR 2025.
  """
  validation.check_choice("mode", mode, MODES)
  validation.check_in_range("b1", b1, 0.0, 1.0)
  validation.check_in_range("b2", b2, 0.0, 1.0)
  validation.check_positive("eps", eps, allow_zero=True)
  validation.check_positive("eps_root", eps_root, allow_zero=True)
  validation.check_positive("lora_scale", lora_scale)
  validation.check_positive("damping", damping, allow_zero=True)
  if mode == "full":
    hyper = _ProHyperparams(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, lora_scale=lora_scale, damping=damping
    )
    update_pair = functools.partial(_full_space_adam, hyper)
    storage = STORAGE
  else:
    update_pair = functools.partial(_projected_gradients, damping, lora_scale)
    storage = LoRAProPairState(mu=None, nu=None)
  finder = routing.PairFinder.create("scale_by_lora_pro", pairing)

  def init_fn(params):
    plan, labels = finder.find(params)
    return ScaleByLoRAProState(
      count=jnp.zeros([], jnp.int32),
      pairs=pairwise.init_pairs(plan, labels, storage),
      bookkeeping=pairwise.init_bookkeeping(plan, labels),
    )

  def update_fn(updates, state, params):
    plan, labels = finder.find(params)
    step = pairwise.update_pairs(update_pair, plan, labels, updates, params, state, storage=storage)
    new_state = state._replace(count=optax.safe_increment(state.count), pairs=step.pairs)
    return step.updates, new_state, step.metrics

  projection = pairwise.transformation(init_fn, update_fn, metrics=False)
  if mode == "full":
    return projection
  return optax.chain(
    projection,
    factorwise.factorwise_transform(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root), finder=finder
    ),
  )


def lora_pro(
  learning_rate: optax.ScalarOrSchedule,
  mode: LoRAProMode = "efficient",
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | None = None,
  *,
  lora_scale: jax.typing.ArrayLike = 1.0,
  damping: jax.typing.ArrayLike = 1e-8,
  pairing: pairing_lib.Pairing = "nnx",
  non_lora: optax.GradientTransformation | None = None,
  strict: bool = False,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-Pro: equivalent-gradient projection with Adam.

  :func:`scale_by_lora_pro` followed by decoupled weight decay and the
  learning rate: ``a ← a − η (δa + λ_wd a)``, likewise ``b``.

  Difference from the reference code beyond :func:`scale_by_lora_pro`: in
  full mode ``peta/optim.py`` decays ``a`` and ``b`` by ``√(1 − ηλ)`` and
  also the frozen base weight ``W0`` by ``1 − ηλ``; an optimizer over the
  LoRA factors does not touch frozen weights, so decay here is the usual
  decoupled decay of the factors (and of ``mask``-selected other leaves).

  Args:
    learning_rate: a float or an optax schedule.
    mode: see :func:`scale_by_lora_pro`.
    b1: see :func:`scale_by_lora_pro`.
    b2: see :func:`scale_by_lora_pro`.
    eps: see :func:`scale_by_lora_pro`.
    eps_root: see :func:`scale_by_lora_pro`.
    weight_decay: decoupled weight decay (multiplied by the learning rate);
      must be >= 0.
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    lora_scale: see :func:`scale_by_lora_pro`.
    damping: see :func:`scale_by_lora_pro`.
    pairing: see :func:`scale_by_lora_pro`.
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
    Wang, Liang, He, Wang, Tan, `LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized? <https://arxiv.org/abs/2407.18242>`_, ICLR 2025.
  """
  # The other hyperparameters are checked by scale_by_lora_pro.
  validation.check_positive("weight_decay", weight_decay, allow_zero=True)
  core = scale_by_lora_pro(
    mode, b1, b2, eps, eps_root, lora_scale=lora_scale, damping=damping, pairing=pairing
  )
  return optax.chain(
    routing.partition_non_lora(core, pairing=pairing, non_lora=non_lora, strict=strict),
    optax.add_decayed_weights(weight_decay, mask),
    *([tracking.track_step_metrics(pairing=pairing)] if metrics else []),
    optax.scale_by_learning_rate(learning_rate),
  )
