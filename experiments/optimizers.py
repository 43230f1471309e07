"""The optimizers compared in the experiments, and how their lr grids are placed.

docs/design.md §8: every optimizer gets its own learning-rate sweep with the same
number of points. The methods' step sizes are not in the same units
(AdaPreLoRA's steps are Adafactor-normalized in weight space, AdamW's in
factor space), so a grid centred by hand would favour someone. Instead every
optimizer goes through the same two stages on every task:

1. pilot: seed 0, the full step budget, the decade grid :data:`PILOT_GRID`;
2. sweep: :data:`GRID_POINTS` learning rates at half-decade spacing centred on
   the pilot's best, every seed. The pilot runs at the centre and one decade
   either side are runs of the sweep (same identity) and are reused.

Weight decay is 0 for all; non-LoRA leaves (the classification heads) are
trained by each method's Adam-style path at the same learning rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import optax

import adaprelora_jax as ap

GRID_POINTS = 5


def constant_decay(step, decay_rate):
  """A constant decay ``β2 = decay_rate`` for the factored statistics (Adam's
  convention), in place of Adafactor's ``1 − (t + 1)^(−decay_rate)``."""
  del step
  return decay_rate


PILOT_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def canonical_lr(value: float) -> float:
  """Three significant digits, so equal grid points compare (and hash) equal."""
  return float(f"{value:.3g}")


def sweep_grid(center: float, points: int = GRID_POINTS) -> tuple[float, ...]:
  """``points`` learning rates at half-decade spacing centred on ``center``."""
  offsets = np.arange(points) - (points - 1) / 2
  return tuple(canonical_lr(center * 10.0 ** (k / 2)) for k in offsets)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """How to build one compared optimizer.

  Attributes:
    factory: ``learning_rate -> optax transform``.
    default_learning_rate: used by the smoke preset (no sweep).
    exact_statistics: build the model with ``adaprelora_jax.nn`` LoRA layers
      (exact gradient statistics in the gradient tree), or
      ``adaprelora_jax.qwix.LoraProvider`` for qwix models.
    description: one line for reports.
    statistics_shards: for qwix models with exact statistics, per-shard
      statistics over this many batch shards (``LoraProvider``'s
      ``statistics_batch_axes``); None: global statistics.
  """

  factory: Callable[[float], optax.GradientTransformation]
  default_learning_rate: float
  exact_statistics: bool = False
  description: str = ""
  statistics_shards: int | None = None


OPTIMIZERS: dict[str, OptimizerSpec] = {
  "adaprelora": OptimizerSpec(
    lambda lr: ap.adaprelora(lr),
    1e-2,
    exact_statistics=True,
    description="AdaPreLoRA, exact statistics from the LoRA layers, no momentum, "
    "the paper's gauge rule (default)",
  ),
  "adaprelora_per_shard": OptimizerSpec(
    lambda lr: ap.adaprelora(lr),
    1e-2,
    exact_statistics=True,
    statistics_shards=8,
    description="AdaPreLoRA, per-shard statistics of 8 batch shards (the data-parallel "
    "option of adaprelora_jax.qwix.LoraProvider; qwix models only)",
  ),
  "adaprelora_tangent": OptimizerSpec(
    lambda lr: ap.adaprelora(lr),
    1e-2,
    description="AdaPreLoRA, statistics estimated from the factor gradients, "
    "the paper's gauge rule (default)",
  ),
  "adaprelora_equal_norms": OptimizerSpec(
    lambda lr: ap.adaprelora(lr, tie_breaker="equal_norms"),
    1e-2,
    exact_statistics=True,
    description="AdaPreLoRA, exact statistics, the earlier equal-norms gauge rule "
    "(not the paper's)",
  ),
  "adaprelora_tangent_equal_norms": OptimizerSpec(
    lambda lr: ap.adaprelora(lr, tie_breaker="equal_norms"),
    1e-2,
    description="AdaPreLoRA, tangent statistics, the earlier equal-norms gauge rule "
    "(not the paper's)",
  ),
  "adaprelora_momentum": OptimizerSpec(
    lambda lr: ap.adaprelora(lr, b1=0.9),
    1e-2,
    exact_statistics=True,
    description="AdaPreLoRA, exact statistics, momentum b1=0.9",
  ),
  "adaprelora_floor_1e-2": OptimizerSpec(
    lambda lr: ap.adaprelora(lr, damping_floor=1e-2),
    1e-2,
    exact_statistics=True,
    description="AdaPreLoRA, exact statistics, damping floor 1e-2 instead of the library's "
    "1e-8 (neither is the paper's): bounds the early jump of a while b is small",
  ),
  "adaprelora_adamw": OptimizerSpec(
    lambda lr: ap.adaprelora_adamw(lr),
    1e-3,
    exact_statistics=True,
    description="AdaPreLoRA AdamW (the paper's second variant, as read here), exact "
    "statistics, inner clipping 1.0, Adafactor decay 0.8 (defaults)",
  ),
  "adaprelora_adamw_noclip": OptimizerSpec(
    lambda lr: ap.adaprelora_adamw(lr, clipping_threshold=None),
    1e-3,
    exact_statistics=True,
    description="AdaPreLoRA AdamW, exact statistics, no inner clipping (tests the default)",
  ),
  "adaprelora_adamw_constant_decay": OptimizerSpec(
    lambda lr: ap.adaprelora_adamw(lr, decay_rate=0.999, decay_rate_fn=constant_decay),
    1e-3,
    exact_statistics=True,
    description="AdaPreLoRA AdamW, exact statistics, constant statistics decay 0.999 "
    "instead of Adafactor's 1 - t^-0.8 (tests the default)",
  ),
  "adaprelora_adamw_surrogate": OptimizerSpec(
    lambda lr: ap.adaprelora_adamw(lr, statistics="surrogate"),
    1e-3,
    description="AdaPreLoRA AdamW, the paper's rank-2r surrogate statistics g_a b + a g_b",
  ),
  "adaprelora_adamw_tangent": OptimizerSpec(
    lambda lr: ap.adaprelora_adamw(lr, statistics="tangent"),
    1e-3,
    description="AdaPreLoRA AdamW, this library's tangent statistics",
  ),
  "adamw": OptimizerSpec(
    lambda lr: optax.adamw(lr, weight_decay=0.0), 1e-3, description="AdamW on the factors (optax)"
  ),
  "lora_plus": OptimizerSpec(
    lambda lr: ap.lora_plus(lr, lr_ratio=16.0),
    1e-3,
    description="LoRA+: AdamW with the B learning rate x16",
  ),
  "scaled_adamw": OptimizerSpec(
    lambda lr: ap.scaled_adamw(lr),
    1e-3,
    description="Riemannian preconditioned LoRA (scaled AdamW)",
  ),
  "lora_pro": OptimizerSpec(
    lambda lr: ap.lora_pro(lr, mode="efficient"),
    1e-3,
    description="LoRA-Pro, efficient mode (Sylvester gauge, factor-space AdamW)",
  ),
  "lora_rite": OptimizerSpec(
    lambda lr: ap.lora_rite(lr),
    1e-3,
    description="LoRA-RITE: transformation-invariant adaptive update",
  ),
}

# The six optimizers of the protocol; the others above are additional variants.
CORE = ("adaprelora", "adamw", "lora_plus", "scaled_adamw", "lora_pro", "lora_rite")
