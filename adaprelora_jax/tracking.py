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
"""A pass-through transform that records the factor metrics of any chain."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from adaprelora_jax._src.discovery import pairing as pairing_lib
from adaprelora_jax._src.engine import pairwise
from adaprelora_jax._src.engine import routing
from adaprelora_jax._src.maths import metrics as metrics_lib
from adaprelora_jax._src.maths import pair_io


class TrackStepMetricsState(NamedTuple):
  """State of :func:`track_step_metrics`.

  Attributes:
    count: number of updates so far (int32).
    bookkeeping: the pairwise engine's
      (:class:`adaprelora_jax._src.engine.pairwise.Bookkeeping`: each pair's place in
      its group, the state layout version).
  """

  count: chex.Array
  bookkeeping: pairwise.Bookkeeping


def _unchanged(
  pair: pair_io.PairInputs, state: None, count: jax.Array, total: jax.Array | None
) -> pair_io.KernelResult:
  """The updates as they come, and the norm of their weight change."""
  del state, count, total
  update_norm = metrics_lib.weight_change_norm(pair.lora_a, pair.lora_b, pair.grad_a, pair.grad_b)
  if pair.lora_scale is not None:
    update_norm = update_norm * jnp.abs(pair.lora_scale)
  return pair_io.KernelResult(pair.grad_a, pair.grad_b, None, {"update_norm": update_norm})


def track_step_metrics(
  *, pairing: pairing_lib.Pairing = "nnx"
) -> optax.GradientTransformationExtraArgs:
  """Pass updates through unchanged, recording their LoRA factor metrics.

  Put it in any chain, after the transforms whose output it should describe
  and before the learning rate, to read with
  :func:`adaprelora_jax.step_metrics` the factor norms (``factor_norm_a``,
  ``factor_norm_b``) and ``update_norm``, ``‖s·(δa b + a δb)‖_F`` of the
  updates reaching it (:mod:`adaprelora_jax._src.maths.metrics`; two 2r×2r Grams per
  pair), e.g. for ``optax.adamw`` or beside
  ``adaprelora(..., metrics=True)``. The baselines' ``metrics=True`` appends
  it. Leaves that are not LoRA factors pass through unchanged.

  Example::

    >>> import jax.numpy as jnp, optax
    >>> from adaprelora_jax import step_metrics, track_step_metrics
    >>> params = {"q": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 4))}}
    >>> tx = optax.chain(optax.scale_by_adam(), track_step_metrics(), optax.scale(-1e-2))
    >>> grads = {"q": {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.ones((2, 4))}}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> float(step_metrics(state)["factor_norm_a/max"])
    4.0

  Args:
    pairing: ``"nnx"``, ``"peft"`` or a pairing callable (see
      :func:`adaprelora_jax.plan_pairs`).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; its
    state is a :class:`adaprelora_jax.WithMetricsState` around a
    :class:`TrackStepMetricsState`.
  """
  finder = routing.PairFinder.create("track_step_metrics", pairing, pass_others=True)

  def init_fn(params):
    plan, labels = finder.find(params)
    return TrackStepMetricsState(
      count=jnp.zeros([], jnp.int32), bookkeeping=pairwise.init_bookkeeping(plan, labels)
    )

  def update_fn(updates, state, params):
    plan, labels = finder.find(params)
    step = pairwise.update_pairs(_unchanged, plan, labels, updates, params, state)
    return step.updates, state._replace(count=optax.safe_increment(state.count)), step.metrics

  return pairwise.transformation(init_fn, update_fn, metrics=True)
