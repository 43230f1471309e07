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
"""The AdaPreLoRA optax transforms."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import chex
import jax
import jax.numpy as jnp
import optax

from adaprelora_jax._src import validation
from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.engine import factorwise
from adaprelora_jax._src.engine import pairwise
from adaprelora_jax._src.engine import routing
from adaprelora_jax._src.engine import slots
from adaprelora_jax._src.maths import closed_form
from adaprelora_jax._src.maths import gauge
from adaprelora_jax._src.maths import pair_update

Statistics = pairing_lib.Statistics
NonFinitePolicy = Literal["skip", "propagate"]


def decay_rate_pow(step: jax.typing.ArrayLike, exponent: jax.typing.ArrayLike = 0.8) -> jax.Array:
  """Adafactor's second-moment decay ``β2_t = 1 − (t + 1)^(−exponent)``.

  Zero at the first step (t = 0), so the first statistics are the first
  gradient's, exactly as optax ``scale_by_factored_rms``.
  """
  # The default float dtype (float64 under x64) rather than a fixed float32.
  t = jnp.asarray(step, jnp.result_type(float)) + 1.0
  # -1 * rather than unary minus: ArrayLike admits numpy.bool, which has none.
  return 1.0 - t ** (-1 * exponent)


class ScaleByAdaPreLoRAState(NamedTuple):
  """State of :func:`scale_by_adaprelora`.

  Float entries are float32, or float64 for float64 parameters; updates keep
  them in that dtype.

  Attributes:
    count: number of updates so far (int32).
    pairs: every pair's :class:`adaprelora_jax._src.maths.pair_update.PairState`, stored as
      :data:`STORAGE` says: the second moments stacked per group of
      same-shaped pairs (the groups of :func:`adaprelora_jax.plan_pairs`, in
      order; one array per group, the first axis running over the group's
      pairs, read them per pair with :func:`second_moments`); the momentum
      in trees that mirror the params, a pair's entries at its ``lora_a``
      and ``lora_b`` positions (so they are sharded like those factors) and
      ``optax.MaskedNode()`` elsewhere, or None when ``b1 is None``; the
      skip counts (:func:`nonfinite_report`) in one int32 vector for all
      pairs.
    bookkeeping: the pairwise engine's
      (:class:`adaprelora_jax._src.engine.pairwise.Bookkeeping`).
  """

  count: chex.Array
  pairs: pair_update.PairState
  bookkeeping: pairwise.Bookkeeping


# Where each field of a pair's state is stored (docs/design.md §10): the
# statistics stacked per group (only the update touches them), the momentum
# at the factors (sharded like them), the skip counts in one vector.
STORAGE = pair_update.PairState(
  row_second_moment=slots.GroupSlot("a", ("d_in",)),
  col_second_moment=slots.GroupSlot("b", ("d_out",)),
  momentum=slots.Slots((slots.Slot("a", ("d_in", "rank")), slots.Slot("b", ("rank", "d_out")))),
  nonfinite_count=slots.PairScalar(jnp.int32),
)


def scale_by_adaprelora(
  decay_rate: float = 0.8,
  eps: float = 1e-30,
  *,
  b1: float | None = None,
  damping: float = 1e-4,
  damping_floor: float = 1e-8,
  clipping_threshold: float | None = 1.0,
  tie_breaker: closed_form.TieBreaker = "min_imbalance",
  project_gradients: bool = True,
  statistics: Statistics = "auto",
  step_offset: int = 0,
  decay_rate_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
  pairing: pairing_lib.Pairing = "nnx",
  nonfinite: NonFinitePolicy = "skip",
  lora_scale: float | None = None,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale LoRA factor gradients with the AdaPreLoRA closed-form step.

  For every LoRA pair ``(a, b)`` with ``ΔW = a @ b`` (flax layout
  ``a: (d_in, r)``, ``b: (r, d_out)``) this keeps Adafactor's factored second
  moment of the *full weight* gradient ``G = ∂L/∂W`` -- a row vector over
  ``d_in`` and a column vector over ``d_out`` -- and returns the factor
  directions whose weight change is the H-orthogonal projection of the
  Adafactor step ``H⁻¹G`` onto the tangent space of the rank-r factorization
  (:func:`adaprelora_jax.factor_update`). State per pair is
  ``O(d_in + d_out)`` (plus ``r (d_in + d_out)`` with momentum); the step
  needs only the factor gradients and costs ``O((d_in + d_out) r² + r³)``.

  Statistics (``statistics=``, ``docs/design.md`` §5): ``"exact"`` uses the
  true row/column means of ``G²`` that :class:`adaprelora_jax.nn.LoRA` layers
  put into the gradient tree (leaves ``grad_sq_rows``/``grad_sq_cols``), the
  paper's backward hook on ``W``; ``"surrogate"`` uses those of the paper's
  rank-2r surrogate ``G̃ = g_a b + a g_b`` (it scales with the factors);
  ``"tangent"`` (this library's estimate, not the paper's) uses those of the
  projection of ``G`` onto the tangent space, which is invariant to the
  factors' scale; the last two come from the factor gradients alone.
  ``"auto"`` (default) uses exact statistics wherever the gradient tree
  carries them and the tangent estimate for every other pair. They are
  decayed as in optax ``scale_by_factored_rms``:
  ``v ← β2_t v + (1 − β2_t) mean(G² + eps)``, ``β2_t = decay_rate_fn(t)``.

  Numerics: statistics and r×r algebra run in float32 or wider whatever the
  parameter dtype; the two r×r solves are damped
  (``S + (damping · tr(S)/r + floor) I``, Cholesky), which keeps the step
  finite and bounded at ``lora_b = 0`` and for rank-deficient factors.
  Update clipping bounds the H-weighted RMS of the weight-space step
  ``δW = δa b + a δb`` by ``clipping_threshold`` (Adafactor's update clipping
  applied to the weight update it preconditions); it costs no extra matmul,
  since ``‖δW‖²_H = ⟨g_a, δa⟩ + ⟨g_b, δb⟩``.

  Non-finite gradients (``nonfinite="skip"``, default): a pair whose factor
  gradients or statistics (or resulting step) are not all finite gets a zero
  update and keeps its state; ``nonfinite_count`` in the state counts the
  skips per pair (see :func:`adaprelora_jax.nonfinite_report`).
  ``"propagate"`` applies no check.

  The transform owns the LoRA factors and their statistics probes (which get
  zero updates) and raises, naming them, for other leaves: :func:`adaprelora`
  trains those with its ``non_lora`` transform, and
  :func:`adaprelora_jax.lora_labels` labels them for an ``optax.partition``
  of one's own.

  Same-shaped pairs are stacked and processed by one ``jax.vmap``, so the
  traced program does not grow with the number of layers.

  Args:
    decay_rate: exponent of the second-moment decay schedule (Adafactor 0.8);
      must be in [0, 1] with the default ``decay_rate_fn`` (0: no memory, 1:
      running mean), passed unchecked to a custom one.
    eps: added to ``G²`` before averaging (Adafactor's ε1); must be >= 0.
    b1: if set, momentum: EMA (bias-corrected) of the clipped factor updates;
      must be in [0, 1) or None.
    damping: relative damping of the r×r solves; must be >= 0.
    damping_floor: absolute damping floor, in units of a squared factor norm
      per rank component; factors much smaller than ``sqrt(damping_floor)``
      are treated as zero (``lora_b`` at init); must be > 0.
    clipping_threshold: bound on the H-weighted RMS of ``δW``; must be > 0,
      or None (disables clipping).
    tie_breaker: the gauge rule, see :func:`adaprelora_jax.factor_update`;
      the default ``"min_imbalance"`` is the paper's.
    project_gradients: remove the gauge component of factor gradients that
      are not those of one ``G`` (weight decay or noise added earlier in a
      chain) before the statistics and the step
      (:func:`adaprelora_jax._src.maths.tangent.consistent_gradients`); a no-op for
      backprop gradients. Without it such gradients give factor steps that
      grow without bound as a factor vanishes, which clipping ``δW`` does not
      catch.
    statistics: ``"auto"``, ``"exact"``, ``"tangent"`` or ``"surrogate"``
      (above).
    step_offset: subtracted from the step count in the decay schedule
      (e.g. when starting from a pretrained optimizer); must be >= 0.
    decay_rate_fn: ``(step, decay_rate) -> β2``; None means
      :func:`decay_rate_pow` (a default callable would be taken for a schedule
      by ``optax.inject_hyperparams``).
    pairing: ``"nnx"`` (``lora_a``/``lora_b`` siblings), ``"peft"``
      (``lora_A``/``lora_B`` in PyTorch layout) or a callable
      ``(path, leaf) -> LoRARole | None`` (see :mod:`adaprelora_jax.pairing`;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    nonfinite: ``"skip"`` or ``"propagate"`` (above).
    lora_scale: the LoRA scale ``s`` of a model computing ``x·(s·a·b)``
      (qwix and peft: ``alpha / rank``); multiplies each pair's
      :attr:`adaprelora_jax.pairing.LoRARole.scale`. The statistics are then
      those of ``G = ∂L/∂W`` and the weight change ``s·(δa b + a δb)`` is the
      projected Adafactor step, so the learning rate means the same step in
      weight space whatever alpha and rank. Without it (None: ``s = 1``) the
      weight-space step of a scaled model is ``s`` times that
      (docs/design.md §9). Must be > 0 or None.
    metrics: keep the last update's metrics in the state, for
      :func:`adaprelora_jax.step_metrics` (``docs/design.md`` §11): the
      factor norms, ``step_h_norm`` (``‖δW‖_H``, the H-norm of the clipped
      weight step), ``clip_factor`` (1 when not clipped), ``tangent_share``
      (``‖δW‖_H / ‖H⁻¹G‖_H`` before clipping, for pairs with exact
      statistics, under Adafactor's factored model of ``G²``:
      :func:`adaprelora_jax._src.maths.pair_update.tangent_share`) and ``skipped_pairs``; the
      step computes all of them anyway. Chain
      :func:`adaprelora_jax.track_step_metrics` after it for the Frobenius
      norm of the weight change. The state is then a
      :class:`adaprelora_jax.WithMetricsState` around this one; off
      (default), it is this one alone, as before metrics existed.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (which
      values are checked: :doc:`/usage`, Policies); at ``init`` or
      ``update``, for leaves that are not LoRA factors or malformed pairs,
      naming their paths.

  References:
    Bian, Cai, Liu, `AdaPreLoRA: adaptive preconditioned low-rank adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.

    Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  gauge.check_rule(tie_breaker)
  validation.check_choice("nonfinite", nonfinite, get_args(NonFinitePolicy))
  validation.check_choice("statistics", statistics, get_args(Statistics))
  if decay_rate_fn is None:
    # The exponent of decay_rate_pow: 0 keeps no memory, 1 is the running
    # mean; beyond 1 older steps would outweigh newer ones, below 0 β2 < 0.
    # A custom decay_rate_fn gives decay_rate its own meaning.
    validation.check_in_range("decay_rate", decay_rate, 0.0, 1.0, include_high=True)
  validation.check_positive("eps", eps, allow_zero=True)
  validation.check_in_range("b1", b1, 0.0, 1.0, allow_none=True)
  validation.check_positive("damping", damping, allow_zero=True)
  validation.check_positive("damping_floor", damping_floor)
  validation.check_positive("clipping_threshold", clipping_threshold, allow_none=True)
  validation.check_positive("step_offset", step_offset, allow_zero=True)
  validation.check_positive("lora_scale", lora_scale, allow_none=True)
  hyper = pair_update.Hyperparams(
    decay_rate=decay_rate,
    eps=eps,
    b1=b1,
    damping=damping,
    damping_floor=damping_floor,
    clipping_threshold=clipping_threshold,
    tie_breaker=tie_breaker,
    project_gradients=project_gradients,
    step_offset=step_offset,
    decay_rate_fn=decay_rate_pow if decay_rate_fn is None else decay_rate_fn,
    nonfinite=nonfinite,
    lora_scale=lora_scale,
    estimate="surrogate" if statistics == "surrogate" else "tangent",
  )
  storage = STORAGE if b1 is not None else STORAGE._replace(momentum=None)
  finder = routing.PairFinder.create("scale_by_adaprelora", pairing, statistics)
  update_pair = functools.partial(pair_update.update_pair, hyper)

  def init_fn(params):
    plan, labels = finder.find(params)
    return ScaleByAdaPreLoRAState(
      count=jnp.zeros([], jnp.int32),
      pairs=pairwise.init_pairs(plan, labels, storage),
      bookkeeping=pairwise.init_bookkeeping(plan, labels),
    )

  def update_fn(updates, state, params):
    plan, labels = finder.find(params)
    # Every group of same-shaped pairs at once: gathered, stepped by
    # pair_update.update_pair (vmapped), scattered back, the new state stored.
    step_ = pairwise.update_pairs(
      update_pair, plan, labels, updates, params, state, storage=storage
    )
    new_state = state._replace(count=optax.safe_increment(state.count), pairs=step_.pairs)
    return step_.updates, new_state, step_.metrics

  return pairwise.transformation(init_fn, update_fn, metrics=metrics)


def adaprelora(
  learning_rate: optax.ScalarOrSchedule,
  decay_rate: float = 0.8,
  eps: float = 1e-30,
  *,
  b1: float | None = None,
  weight_decay: float = 0.0,
  mask: Any | None = None,
  damping: float = 1e-4,
  damping_floor: float = 1e-8,
  clipping_threshold: float | None = 1.0,
  tie_breaker: closed_form.TieBreaker = "min_imbalance",
  project_gradients: bool = True,
  statistics: Statistics = "auto",
  step_offset: int = 0,
  decay_rate_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
  pairing: pairing_lib.Pairing = "nnx",
  non_lora: optax.GradientTransformation | None = None,
  strict: bool = False,
  nonfinite: NonFinitePolicy = "skip",
  lora_scale: float | None = None,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaPreLoRA: adaptive preconditioned optimizer for LoRA factors.

  :func:`scale_by_adaprelora` followed by decoupled weight decay and the
  learning rate, in the order of ``optax.adamw``: the parameter update is
  ``−learning_rate · (preconditioned step + weight_decay · param)``.

  Example::

    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from adaprelora_jax import adaprelora
    >>> model = nnx.LoRA(8, 2, 4, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, adaprelora(1e-2), wrt=nnx.LoRAParam)
    >>> x, y = jnp.ones((16, 8)), jnp.ones((16, 4))
    >>> loss = lambda m: jnp.mean((m(x) - y) ** 2)
    >>> for _ in range(3):
    ...   grads = nnx.grad(loss)(model)
    ...   _ = optimizer.update(model, grads)
    >>> bool(loss(model) < 1.0)
    True

  Args:
    learning_rate: a float or an optax schedule.
    decay_rate: see :func:`scale_by_adaprelora`.
    eps: see :func:`scale_by_adaprelora`.
    b1: see :func:`scale_by_adaprelora`.
    weight_decay: decoupled weight decay (applied to every leaf selected by
      ``mask``; exact-statistics leaves are zero and stay zero); must be >= 0.
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    damping: see :func:`scale_by_adaprelora`.
    damping_floor: see :func:`scale_by_adaprelora`.
    clipping_threshold: see :func:`scale_by_adaprelora`.
    tie_breaker: see :func:`scale_by_adaprelora`.
    project_gradients: see :func:`scale_by_adaprelora`.
    statistics: see :func:`scale_by_adaprelora`.
    step_offset: see :func:`scale_by_adaprelora`.
    decay_rate_fn: see :func:`scale_by_adaprelora`.
    pairing: see :func:`scale_by_adaprelora`.
    non_lora: transform for leaves that are not LoRA factors (e.g. a
      classifier head), routed by ``optax.partition``
      (:func:`adaprelora_jax.lora_labels`); default ``optax.scale_by_adam()``.
    strict: raise, naming them, if the params contain leaves that are not
      LoRA factors.
    nonfinite: see :func:`scale_by_adaprelora`.
    lora_scale: see :func:`scale_by_adaprelora` (e.g. qwix's
      ``alpha / rank``).
    metrics: see :func:`scale_by_adaprelora`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (see
      :func:`scale_by_adaprelora`).

  References:
    Bian, Cai, Liu, `AdaPreLoRA: adaptive preconditioned low-rank adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.
  """
  # The other hyperparameters are checked by scale_by_adaprelora.
  validation.check_positive("weight_decay", weight_decay, allow_zero=True)
  core = scale_by_adaprelora(
    decay_rate=decay_rate,
    eps=eps,
    b1=b1,
    damping=damping,
    damping_floor=damping_floor,
    clipping_threshold=clipping_threshold,
    tie_breaker=tie_breaker,
    project_gradients=project_gradients,
    statistics=statistics,
    step_offset=step_offset,
    decay_rate_fn=decay_rate_fn,
    pairing=pairing,
    nonfinite=nonfinite,
    lora_scale=lora_scale,
    metrics=metrics,
  )
  return optax.chain(
    routing.partition_non_lora(core, pairing=pairing, non_lora=non_lora, strict=strict),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def adaprelora_adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | None = None,
  *,
  nesterov: bool = False,
  decay_rate: float = 0.8,
  statistics_eps: float = 1e-30,
  damping: float = 1e-4,
  damping_floor: float = 1e-8,
  clipping_threshold: float | None = 1.0,
  tie_breaker: closed_form.TieBreaker = "min_imbalance",
  project_gradients: bool = True,
  statistics: Statistics = "auto",
  step_offset: int = 0,
  decay_rate_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
  pairing: pairing_lib.Pairing = "nnx",
  non_lora: optax.GradientTransformation | None = None,
  strict: bool = False,
  nonfinite: NonFinitePolicy = "skip",
  lora_scale: float | None = None,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaPreLoRA AdamW: AdamW's moments over the AdaPreLoRA factor directions.

  The paper's second variant, as this library reads it (``docs/design.md``
  §7: the paper's text was not available, and how its AdamW variant is built
  is not recovered). Both AdamW-based LoRA optimizers the paper compares with
  feed their corrected factor directions into AdamW's moments (LoRA-Pro AdamW
  its adjusted gradients, Scaled AdamW its preconditioned gradients), so here
  the AdaPreLoRA directions ``(δa, δb)`` of :func:`scale_by_adaprelora` (the
  H-projected Adafactor step, clipped in weight space, no momentum of its
  own) are fed to ``optax.scale_by_adam`` per factor, followed by decoupled
  weight decay and the learning rate, as ``optax.adamw``::

    (δa, δb) = AdaPreLoRA(g_a, g_b),   a ← a − η (Adam(δa) + λ_wd a),
                                       b ← b − η (Adam(δb) + λ_wd b)

  The learning rate therefore has AdamW's units (a per-coordinate step of
  about ``η``), not :func:`adaprelora`'s (a weight-space step of H-RMS about
  ``η``). Leaves that are not LoRA factors get AdamW with the same ``b1``,
  ``b2``, ``eps`` (exactly one Adam, as ``optax.adamw``), or ``non_lora``.
  State: Adam's two factor-shaped moments (float32, or ``mu_dtype`` for the
  first) plus the ``O(d_in + d_out)`` factored second moments per pair.

  Non-finite gradients (``nonfinite="skip"``): a skipped pair's direction is
  zero, so its factored statistics keep their state while Adam's moments
  decay one step, as ``optax.adamw`` given a zero gradient.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adaprelora_jax import adaprelora_adamw
    >>> model = nnx.LoRA(8, 2, 4, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, adaprelora_adamw(1e-2), wrt=nnx.LoRAParam)
    >>> x, y = jnp.ones((16, 8)), jnp.ones((16, 4))
    >>> loss = lambda m: jnp.mean((m(x) - y) ** 2)
    >>> for _ in range(3):
    ...   grads = nnx.grad(loss)(model)
    ...   _ = optimizer.update(model, grads)
    >>> bool(loss(model) < 1.0)
    True

  Args:
    learning_rate: a float or an optax schedule.
    b1: Adam's first-moment decay; must be in [0, 1).
    b2: Adam's second-moment decay; must be in [0, 1).
    eps: added to Adam's denominator, outside the square root; must be >= 0.
    eps_root: added to Adam's second moment inside the square root; must be
      >= 0.
    mu_dtype: dtype of Adam's first moment (``optax.scale_by_adam``); None:
      float32, or the parameter dtype where that is wider.
    weight_decay: decoupled weight decay (applied to every leaf selected by
      ``mask``); must be >= 0.
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    nesterov: Nesterov momentum in Adam (``optax.scale_by_adam``).
    decay_rate: exponent of the factored statistics' decay schedule, see
      :func:`scale_by_adaprelora` (Adafactor 0.8, this library's default;
      the paper's is not recovered).
    statistics_eps: added to ``G²`` before averaging (Adafactor's ε1,
      :func:`scale_by_adaprelora`'s ``eps``); must be >= 0.
    damping: see :func:`scale_by_adaprelora`.
    damping_floor: see :func:`scale_by_adaprelora`.
    clipping_threshold: bound on the H-weighted RMS of the direction's
      weight change before Adam (see :func:`scale_by_adaprelora`); None
      disables it. The default 1.0 is this library's choice, measured
      against None in ``experiments/RESULTS.md``.
    tie_breaker: see :func:`scale_by_adaprelora`.
    project_gradients: see :func:`scale_by_adaprelora`.
    statistics: see :func:`scale_by_adaprelora`.
    step_offset: see :func:`scale_by_adaprelora`.
    decay_rate_fn: see :func:`scale_by_adaprelora`.
    pairing: see :func:`scale_by_adaprelora`.
    non_lora: transform for leaves that are not LoRA factors, routed by
      ``optax.partition`` (:func:`adaprelora_jax.lora_labels`); default
      ``optax.scale_by_adam`` with ``b1``, ``b2``, ``eps``, ``eps_root``,
      ``mu_dtype`` and ``nesterov`` above.
    strict: see :func:`adaprelora`.
    nonfinite: ``"skip"`` or ``"propagate"`` (above).
    lora_scale: see :func:`scale_by_adaprelora`.
    metrics: see :func:`scale_by_adaprelora`; they describe the AdaPreLoRA
      direction fed to Adam.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (see
      :func:`scale_by_adaprelora`).

  References:
    Bian, Cai, Liu, `AdaPreLoRA: adaptive preconditioned low-rank adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  # The preconditioner's hyperparameters are checked by scale_by_adaprelora.
  validation.check_in_range("b1", b1, 0.0, 1.0)
  validation.check_in_range("b2", b2, 0.0, 1.0)
  validation.check_positive("eps", eps, allow_zero=True)
  validation.check_positive("eps_root", eps_root, allow_zero=True)
  validation.check_positive("weight_decay", weight_decay, allow_zero=True)
  # Checked here so that the error names this function's argument, not the
  # core's eps.
  validation.check_positive("statistics_eps", statistics_eps, allow_zero=True)
  adam = optax.scale_by_adam(
    b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
  )
  directions = optax.chain(
    scale_by_adaprelora(
      decay_rate=decay_rate,
      eps=statistics_eps,
      damping=damping,
      damping_floor=damping_floor,
      clipping_threshold=clipping_threshold,
      tie_breaker=tie_breaker,
      project_gradients=project_gradients,
      statistics=statistics,
      step_offset=step_offset,
      decay_rate_fn=decay_rate_fn,
      pairing=pairing,
      nonfinite=nonfinite,
      lora_scale=lora_scale,
      metrics=metrics,
    ),
    factorwise.factorwise_transform(
      adam, finder=routing.PairFinder.create("adaprelora_adamw", pairing)
    ),
  )
  return optax.chain(
    # The other leaves get the same Adam, once, as in optax.adamw.
    routing.partition_non_lora(
      directions, pairing=pairing, non_lora=adam if non_lora is None else non_lora, strict=strict
    ),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )
