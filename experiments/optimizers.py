"""The optimizers compared in the experiments, with their learning-rate grids.

DESIGN.md §8: every optimizer gets its own learning-rate sweep with the same
number of points, centred where that method is normally run (LoRA AdamW
around 1e-3; AdaPreLoRA steps are Adafactor-normalized in weight space, so
its grid sits higher). Weight decay is 0 for all; non-LoRA leaves (the
classification heads) are trained by each method's Adam-style path at the
same learning rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import optax

import adaprelora_jax as ap

GRID_POINTS = 5


def log_grid(center: float, points: int = GRID_POINTS, ratio: float = np.sqrt(10.0)) -> tuple[float, ...]:
  """``points`` learning rates spaced by ``ratio`` (half a decade) around ``center``."""
  offsets = np.arange(points) - (points - 1) / 2
  return tuple(float(f"{center * ratio**k:.3g}") for k in offsets)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """How to build one compared optimizer.

  Attributes:
    factory: ``learning_rate -> optax transform``.
    learning_rates: the sweep grid (``GRID_POINTS`` values).
    exact_statistics: build the model with ``adaprelora_jax.nn`` LoRA layers
      (exact gradient statistics in the gradient tree).
    description: one line for reports.
  """

  factory: Callable[[float], optax.GradientTransformation]
  learning_rates: tuple[float, ...]
  exact_statistics: bool = False
  description: str = ""


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adaprelora": OptimizerSpec(
        lambda lr: ap.adaprelora(lr), log_grid(1e-2), exact_statistics=True,
        description="AdaPreLoRA, exact statistics from the LoRA layers, no momentum"),
    "adaprelora_tangent": OptimizerSpec(
        lambda lr: ap.adaprelora(lr), log_grid(1e-2),
        description="AdaPreLoRA, statistics estimated from the factor gradients"),
    "adaprelora_momentum": OptimizerSpec(
        lambda lr: ap.adaprelora(lr, b1=0.9), log_grid(1e-2), exact_statistics=True,
        description="AdaPreLoRA, exact statistics, momentum b1=0.9"),
    "adamw": OptimizerSpec(
        lambda lr: optax.adamw(lr, weight_decay=0.0), log_grid(1e-3),
        description="AdamW on the factors (optax)"),
}

# The six optimizers of the protocol; the others above are additional variants.
CORE = ("adaprelora", "adamw", "lora_plus", "scaled_adamw", "lora_pro", "lora_rite")
