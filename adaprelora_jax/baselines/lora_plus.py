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
"""LoRA+: a larger learning rate for ``lora_b`` (Hayou, Ghosh, Yu, 2024)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from adaprelora_jax import tracking
from adaprelora_jax._src import validation
from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.discovery import plan as plan_lib
from adaprelora_jax._src.engine import factorwise
from adaprelora_jax._src.engine import routing


def scale_by_lora_plus(
  lr_ratio: jax.typing.ArrayLike,
  *,
  pairing: pairing_lib.Pairing = "nnx",
) -> optax.GradientTransformationExtraArgs:
  r"""Multiply the update of every ``lora_b`` by ``lr_ratio``.

  LoRA+ gives the B factor (``lora_b``, zero at init) the learning rate
  ``λ·η`` and the A factor ``η``. A per-parameter learning rate multiplies the
  whole step of the base optimizer, decoupled weight decay included, so place
  this transform after the base optimizer and its weight decay, e.g.
  ``optax.chain(optax.adamw(η, weight_decay=λ_wd), scale_by_lora_plus(16.0))``
  gives every base optimizer its LoRA+ variant. Every other leaf (``lora_a``,
  non-LoRA parameters) passes through unchanged. Stateless.

  Args:
    lr_ratio: ``λ = η_B / η_A`` (the paper recommends ``λ > 1``); must be
      > 0.
    pairing: ``"nnx"``, ``"peft"`` or a pairing callable (see
      :func:`adaprelora_jax.plan_pairs`); malformed pairs raise an
      error naming the parameter path.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, naming it (which
      values are checked: :doc:`/usage`, Policies).

  References:
    Hayou, Ghosh, Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
    <https://arxiv.org/abs/2402.12354>`_, ICML 2024.
  """
  validation.check_positive("lr_ratio", lr_ratio)
  pairing_fn = pairing_lib.resolve_pairing(pairing)

  def b_factors(tree: Any) -> Any:
    plan = plan_lib.plan_pairs(tree, pairing_fn)
    return plan.mirror(lambda pair, role: True, roles=("b",), fill=False)

  return optax.masked(optax.scale(lr_ratio), b_factors)


def lora_plus(
  learning_rate: optax.ScalarOrSchedule,
  lr_ratio: jax.typing.ArrayLike = 16.0,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | None = None,
  *,
  pairing: pairing_lib.Pairing = "nnx",
  non_lora: optax.GradientTransformation | None = None,
  strict: bool = False,
  metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA+: AdamW with the ``lora_b`` learning rate multiplied by ``lr_ratio``.

  Each LoRA factor is updated by AdamW (``optax.scale_by_adam`` on that
  factor's own gradient, decoupled weight decay), ``lora_a`` with learning rate
  ``η`` and ``lora_b`` with ``λ·η``::

    a ← a − η   (m̂_a / (√v̂_a + ε) + λ_wd · a)
    b ← b − λ·η (m̂_b / (√v̂_b + ε) + λ_wd · b)

  With ``lr_ratio=1`` and float32 parameters this is exactly ``optax.adamw``
  with the same ``weight_decay`` (optax's default is 1e-4, ours 0). Moments
  are kept in float32 (or wider) whatever the parameter dtype. Leaves that are
  not LoRA factors are updated by ``non_lora`` (default: Adam) at learning
  rate ``η``.

  Differences from the reference code (``create_loraplus_optimizer`` of
  ``nikhil-ghosh-berkeley/loraplus``, also PEFT's port):

  * The reference puts *every one-dimensional* trainable parameter (biases,
    norm scales, DoRA magnitudes) into the B group with learning rate ``λ·η``
    (decayed only if the Trainer's decay list holds them); that follows from
    an ``ndim == 1`` test, not from the paper, which scales ``B`` only. Here
    only ``lora_b`` leaves get ``λ·η``; other leaves get ``η`` and the weight
    decay selected by ``mask``. To
    reproduce the reference grouping, append
    ``optax.masked(optax.scale(lr_ratio), lambda p: jax.tree.map(lambda x:
    x.ndim == 1, p))`` to the chain (and mask their decay).
  * The reference's separate learning rate for LoRA *embedding* layers
    (``loraplus_lr_embedding``, default 1e-6) has no counterpart: embedding
    adapters are ordinary pairs here.
  * The reference has no default ratio; 16 (= 2⁴) is a common starting point.

  Args:
    learning_rate: ``η``, a float or an optax schedule.
    lr_ratio: ``λ = η_B / η_A``; must be > 0.
    b1: Adam's first-moment decay; must be in [0, 1).
    b2: Adam's second-moment decay; must be in [0, 1).
    eps: added to the denominator, outside the square root; must be >= 0.
    eps_root: added to the second moment inside the square root; must be
      >= 0.
    weight_decay: decoupled weight decay ``λ_wd`` (multiplied by the
      learning rate, so ``λ·η·λ_wd`` for ``lora_b``); must be >= 0.
    mask: tree or callable selecting the leaves to decay (optax convention;
      list a callable in ``static_args`` of ``optax.inject_hyperparams``).
    pairing: ``"nnx"`` (``lora_a``/``lora_b`` siblings), ``"peft"``
      (``lora_A``/``lora_B`` in PyTorch layout) or a callable
      ``(path, leaf) -> LoRARole | None`` (list it in ``static_args`` of
      ``optax.inject_hyperparams``).
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
    Hayou, Ghosh, Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
    <https://arxiv.org/abs/2402.12354>`_, ICML 2024.
  """
  # lr_ratio is checked by scale_by_lora_plus.
  validation.check_in_range("b1", b1, 0.0, 1.0)
  validation.check_in_range("b2", b2, 0.0, 1.0)
  validation.check_positive("eps", eps, allow_zero=True)
  validation.check_positive("eps_root", eps_root, allow_zero=True)
  validation.check_positive("weight_decay", weight_decay, allow_zero=True)
  return optax.chain(
    routing.partition_non_lora(
      factorwise.factorwise_transform(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        finder=routing.PairFinder.create("lora_plus", pairing),
      ),
      pairing=pairing,
      non_lora=non_lora,
      strict=strict,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    scale_by_lora_plus(lr_ratio, pairing=pairing),
    *([tracking.track_step_metrics(pairing=pairing)] if metrics else []),
    optax.scale_by_learning_rate(learning_rate),
  )
