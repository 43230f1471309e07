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
"""One LoRA pair's AdaPreLoRA step, as a composition of small pure functions.

:func:`update_pair` is the kernel that
:func:`adaprelora_jax.scale_by_adaprelora` maps over
each group of same-shaped pairs (:func:`adaprelora_jax._src.engine.pairwise.map_groups`):
it projects the factor
gradients, decays the factored second moments, takes the closed-form step
(:mod:`adaprelora_jax._src.maths.closed_form`), clips it, applies momentum and skips the
pair if anything is not finite (``docs/design.md`` §3–§6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adaprelora_jax._src.maths import closed_form
from adaprelora_jax._src.maths import linalg
from adaprelora_jax._src.maths import metrics as metrics_lib
from adaprelora_jax._src.maths import pair_io
from adaprelora_jax._src.maths import tangent


def all_finite(*arrays: jax.Array) -> jax.Array:
  """Whether every entry of every array is finite, as one scalar.

  A sum is non-finite iff an entry is (NaN and ±inf propagate), unless the
  sum of finite entries overflows, far beyond where ``G²`` statistics already
  would. Float sums compile faster than boolean ``isfinite`` reductions on
  CPU, and XLA fuses them with the step's other reductions.
  """
  total = sum(jnp.sum(x, dtype=linalg.compute_dtype(x)) for x in arrays)
  return jnp.isfinite(total)


def keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``ok``, else ``old`` (trees of the same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def decayed_moment(
  moment: jax.Array, statistic: jax.Array, beta2: jax.Array, eps: jax.typing.ArrayLike
) -> jax.Array:
  """Adafactor's decayed second moment ``β2 v + (1 − β2)(mean(G²) + eps)``."""
  return beta2 * moment + (1.0 - beta2) * (statistic + eps)


def weighted_rms_clip_factor(
  descent: jax.Array,
  row_scale: jax.Array,
  col_scale: jax.Array,
  threshold: jax.typing.ArrayLike,
) -> jax.Array:
  """The factor in (0, 1] that brings the H-weighted RMS of ``δW`` to <= ``threshold``.

  The RMS is ``sqrt(‖δW‖²_H / Σ_ij p_i q_j)``, 1 for a step of unit entries
  when the statistics match (Adafactor's RMS(U) = 1); ``descent`` is
  ``‖δW‖²_H = ⟨g_a, δa⟩ + ⟨g_b, δb⟩`` (docs/design.md §6).
  """
  weight_total = jnp.sum(row_scale) * jnp.sum(col_scale)
  rms = jnp.sqrt(jnp.maximum(descent, 0.0) / weight_total)
  return 1.0 / jnp.maximum(1.0, rms / threshold)


def tangent_share(
  descent: jax.Array,
  row_stats: jax.Array,
  col_stats: jax.Array,
  row_scale: jax.Array,
  col_scale: jax.Array,
) -> jax.Array:
  """``‖δW‖_H / ‖H⁻¹G‖_H``: the share of the Adafactor step the tangent step keeps.

  ``‖H⁻¹G‖²_H = Σ_ij G²_ij / (p_i q_j)`` needs all of ``G²``; the statistics
  hold its row and column means, so ``G²`` is taken as Adafactor models it,
  ``r cᵀ / mean(r)`` (exact when ``G²`` has rank one, e.g. one token), which
  gives ``(Σ_i r_i/p_i)(Σ_j c_j/q_j) / mean(r)``. ``descent`` is
  ``‖δW‖²_H`` of the unclipped step (docs/design.md §6). A pair with no
  gradient (``G = 0``, e.g. an adapter the loss does not reach) has nothing
  to capture: its share is 1.
  """
  mean_row = jnp.mean(row_stats)
  full = jnp.sum(row_stats / row_scale) * jnp.sum(col_stats / col_scale) / mean_row
  has_gradient = mean_row > 0
  ratio = jnp.maximum(descent, 0.0) / jnp.where(has_gradient, full, 1.0)
  return jnp.where(has_gradient, jnp.sqrt(ratio), 1.0)


def momentum_step(
  momentum: tuple[jax.Array, jax.Array],
  deltas: tuple[jax.Array, jax.Array],
  b1: jax.typing.ArrayLike,
  count: jax.Array,
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """The new EMA of the factor steps, and the bias-corrected steps."""
  (old_a, old_b), (delta_a, delta_b) = momentum, deltas
  new_a, new_b = old_a * b1 + delta_a * (1.0 - b1), old_b * b1 + delta_b * (1.0 - b1)
  bias_correction = 1.0 - jnp.power(b1, (count + 1).astype(delta_a.dtype))
  return (new_a, new_b), (new_a / bias_correction, new_b / bias_correction)


class PairState(NamedTuple):
  """One pair's AdaPreLoRA state, as :func:`update_pair` reads and returns it.

  :class:`adaprelora_jax.ScaleByAdaPreLoRAState` holds every pair's, stored
  as :data:`adaprelora_jax.transform.STORAGE` says.

  Attributes:
    row_second_moment: EMA of the row means of ``G²`` (d_in,), float32 or
      wider.
    col_second_moment: EMA of the column means of ``G²`` (d_out,).
    momentum: EMA of the factor steps ``(m_a (d_in, r), m_b (r, d_out))``,
      or None without momentum (``b1=None``).
    nonfinite_count: how many of the pair's steps were skipped (int32).
  """

  row_second_moment: Any
  col_second_moment: Any
  momentum: Any
  nonfinite_count: Any


class Hyperparams(NamedTuple):
  """:func:`scale_by_adaprelora`'s arguments, as the pair kernel reads them."""

  decay_rate: Any
  eps: Any
  b1: Any
  damping: Any
  damping_floor: Any
  clipping_threshold: Any
  tie_breaker: closed_form.TieBreaker
  project_gradients: bool
  step_offset: Any
  decay_rate_fn: Callable[[jax.Array, Any], jax.Array]
  nonfinite: str
  lora_scale: jax.typing.ArrayLike | None
  # The estimate for pairs without exact statistics: "tangent" (for "auto"
  # and "exact" too) or "surrogate".
  estimate: str = "tangent"


def pair_lora_scale(
  lora_scale: jax.typing.ArrayLike | None, pair_scale: jax.Array | None
) -> jax.typing.ArrayLike | None:
  """A pair's LoRA scale: the optimizer's times the pairing's; None if neither
  is set (then the step is exactly that of s = 1, with no extra ops)."""
  if lora_scale is None:
    return pair_scale
  return lora_scale if pair_scale is None else lora_scale * pair_scale


def _pair_statistics(
  estimate: str,
  pair: pair_io.PairInputs,
  a: jax.Array,
  b: jax.Array,
  g_a: jax.Array,
  g_b: jax.Array,
  grams: tangent.PairGrams,
  inverses: tangent.GramInverses,
  scale: jax.typing.ArrayLike | None,
) -> tuple[jax.Array, jax.Array]:
  """Row and column means of ``G²``: exact where the pair carries them, else
  the ``estimate`` (docs/design.md §5)."""
  # Gathered together (pairwise.py): both or neither.
  row_stats, col_stats = pair.row_stats, pair.col_stats
  if row_stats is None or col_stats is None:
    if estimate == "surrogate":
      return tangent.surrogate_statistics_from_grams(a, b, g_a, g_b, grams)
    return tangent.tangent_statistics_from_grams(a, b, g_a, g_b, grams, inverses)
  row_stats = row_stats.astype(linalg.compute_dtype(row_stats))
  col_stats = col_stats.astype(linalg.compute_dtype(col_stats))
  if scale is not None:
    # Exact statistics are those of the gradient of a·b, like the factor
    # gradients (docs/design.md §9): divided by s² they are those of G.
    row_stats, col_stats = row_stats / scale**2, col_stats / scale**2
  return row_stats, col_stats


def update_pair(
  hyper: Hyperparams,
  pair: pair_io.PairInputs,
  state: PairState,
  count: jax.Array,
  total: None,
) -> pair_io.KernelResult:
  """One pair's AdaPreLoRA step (the kernel of
  :func:`adaprelora_jax.scale_by_adaprelora`), with its metrics."""
  del total
  a, b, g_a, g_b = pair.lora_a, pair.lora_b, pair.grad_a, pair.grad_b
  # docs/design.md §9: for ΔW = s·a·b the factor gradients are s·J*(G);
  # divided by s they are J*(G) of the unit map, and the unit map's step
  # divided by s gives the same weight change s·J(δ) as the Adafactor step.
  scale = pair_lora_scale(hyper.lora_scale, pair.lora_scale)
  if scale is not None:
    g_a, g_b = g_a / scale, g_b / scale
  # One set of Grams for the projection, the estimated statistics and the
  # step (docs/design.md §4-§5).
  estimated_statistics = pair.row_stats is None
  grams = tangent.pair_grams(a, b, g_a, g_b, gradient_grams=estimated_statistics)
  inverses = tangent.gram_inverses(grams, damping=hyper.damping, damping_floor=hyper.damping_floor)
  if hyper.project_gradients:
    g_a, g_b, grams = tangent.consistent_gradients_unless_identity(a, b, g_a, g_b, grams, inverses)
  row_stats, col_stats = _pair_statistics(
    hyper.estimate, pair, a, b, g_a, g_b, grams, inverses, scale
  )
  beta2 = hyper.decay_rate_fn(count - hyper.step_offset, hyper.decay_rate)
  row_moment = decayed_moment(state.row_second_moment, row_stats, beta2, hyper.eps)
  col_moment = decayed_moment(state.col_second_moment, col_stats, beta2, hyper.eps)
  new_state = PairState(row_moment, col_moment, None, state.nonfinite_count)
  row_scale, col_scale = closed_form.factored_scales(row_moment, col_moment)
  step = closed_form.factor_step(
    a,
    b,
    g_a,
    g_b,
    row_scale,
    col_scale,
    damping=hyper.damping,
    damping_floor=hyper.damping_floor,
    tie_breaker=hyper.tie_breaker,
    cross=(grams.cross_a, grams.cross_b),
  )
  deltas = (step.delta_a, step.delta_b)
  clip_factor = jnp.ones([], step.descent.dtype)
  if hyper.clipping_threshold is not None:
    clip_factor = weighted_rms_clip_factor(
      step.descent, row_scale, col_scale, hyper.clipping_threshold
    )
    deltas = (deltas[0] * clip_factor, deltas[1] * clip_factor)
  # Unused outputs are dropped when the transform keeps no metrics.
  metrics = {
    "step_h_norm": jnp.sqrt(jnp.maximum(step.descent, 0.0)) * clip_factor,
    "clip_factor": clip_factor,
  }
  if pair.row_stats is not None:
    metrics["tangent_share"] = tangent_share(
      step.descent, row_stats, col_stats, row_scale, col_scale
    )
  if scale is not None:
    deltas = (deltas[0] / scale, deltas[1] / scale)
  if hyper.b1 is not None:
    momentum, deltas = momentum_step(state.momentum, deltas, hyper.b1, count)
    new_state = new_state._replace(momentum=momentum)
  skipped = jnp.array(False)
  if hyper.nonfinite == "skip":
    # The step's descent u + v − w is checked, and exact statistics, but
    # not the factor gradients or the step itself: a non-finite entry of
    # g_a, g_b, a, b, p or q reaches X_a, X_b or the r×r inverses through
    # arithmetic that keeps NaN and ±inf (0·inf is NaN), hence
    # u = ⟨g_a, X_a⟩ or v = ⟨g_b, X_b⟩ (docs/design.md §6). A scalar check
    # lets the select fuse into the pass that forms the step; a reduction
    # over δa, δb costs two more passes over the factors. A +inf statistic
    # need not make the step non-finite (it only zeroes its row or column)
    # and must not enter the moments.
    checked = [step.descent] + ([] if pair.row_stats is None else [row_stats, col_stats])
    ok = all_finite(*checked)
    new_state = keep_if_finite(ok, new_state, state)
    deltas = (jnp.where(ok, deltas[0], 0.0), jnp.where(ok, deltas[1], 0.0))
    skipped = ~ok
  new_state = new_state._replace(nonfinite_count=state.nonfinite_count + skipped.astype(jnp.int32))
  return pair_io.KernelResult(*deltas, new_state, {**metrics, metrics_lib.SKIPPED: skipped})
