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
"""AdaPreLoRA: an adaptive preconditioned optimizer for LoRA factors (optax).

Main entry points:

* :func:`adaprelora` -- the full optimizer (learning rate, weight decay): the
  paper's AdaPreLoRA SGD.
* :func:`adaprelora_adamw` -- the paper's AdaPreLoRA AdamW: AdamW's moments
  over the AdaPreLoRA factor directions.
* :func:`scale_by_adaprelora` -- the chainable core transform (LoRA factors
  only; :func:`lora_labels` labels the other leaves for ``optax.partition``).
* :func:`factor_update` -- the pure closed-form factor step.
* :mod:`adaprelora_jax.nn` -- flax nnx LoRA layers with exact statistics
  (imported on first use: the optimizer itself does not import flax).
* :mod:`adaprelora_jax.qwix` -- a ``qwix.LoraProvider`` whose LoRA ops (Tunix,
  MaxText) hand the optimizer exact statistics (needs qwix; imported on
  first use of ``adaprelora_jax.qwix``).
* :mod:`adaprelora_jax.pairing` and :mod:`adaprelora_jax.dimension_numbers`
  -- which leaves are LoRA pairs (flax nnx, qwix, peft names; N-D factors),
  and :func:`plan_pairs`, what an optimizer finds in a tree.
* :mod:`adaprelora_jax.sharding` -- optimizer-state shardings from the
  parameters' shardings (pjit / NamedSharding, flax nnx partitioning).
* :func:`step_metrics` -- the last update's metrics (H-norm of the step,
  clipping, tangent share, factor norms, skipped pairs) for a trainer's logs
  (``metrics=True``, or :func:`track_step_metrics` in any chain).
* :func:`check_checkpoint_layout` -- checks a saved optimizer state's layout
  version before an orbax restore (:data:`STATE_LAYOUT_VERSION`).
* :mod:`adaprelora_jax.baselines` -- the LoRA optimizers it is compared with:
  :func:`lora_plus`, :func:`scaled_gd`, :func:`scaled_adamw`,
  :func:`lora_pro`, :func:`lora_rite` (and their ``scale_by_*`` cores).
"""

from adaprelora_jax import baselines
from adaprelora_jax import dimension_numbers
from adaprelora_jax import pairing
from adaprelora_jax import reports
from adaprelora_jax import sharding
from adaprelora_jax._src.discovery.plan import LoRAPlan
from adaprelora_jax._src.discovery.plan import plan_pairs
from adaprelora_jax._src.engine.routing import lora_labels
from adaprelora_jax._src.engine.state_layout import STATE_LAYOUT_VERSION
from adaprelora_jax._src.engine.state_layout import StateLayoutError
from adaprelora_jax._src.engine.state_layout import check_checkpoint_layout
from adaprelora_jax._src.engine.state_layout import check_state_layout
from adaprelora_jax._src.maths.closed_form import TIE_BREAKERS
from adaprelora_jax._src.maths.closed_form import FactorStep
from adaprelora_jax._src.maths.closed_form import factor_step
from adaprelora_jax._src.maths.closed_form import factor_update
from adaprelora_jax._src.maths.closed_form import factored_scales
from adaprelora_jax._src.maths.metrics import StepMetrics
from adaprelora_jax._src.maths.metrics import WithMetricsState
from adaprelora_jax.baselines import lora_plus
from adaprelora_jax.baselines import lora_pro
from adaprelora_jax.baselines import lora_rite
from adaprelora_jax.baselines import scale_by_lora_plus
from adaprelora_jax.baselines import scale_by_lora_pro
from adaprelora_jax.baselines import scale_by_lora_rite
from adaprelora_jax.baselines import scale_by_riemannian_preconditioner
from adaprelora_jax.baselines import scaled_adamw
from adaprelora_jax.baselines import scaled_gd
from adaprelora_jax.dimension_numbers import LoRADimensionNumbers
from adaprelora_jax.pairing import LoRARole
from adaprelora_jax.pairing import annotate_pairing
from adaprelora_jax.pairing import nnx_pairing
from adaprelora_jax.pairing import peft_pairing
from adaprelora_jax.reports import nonfinite_report
from adaprelora_jax.reports import second_moments
from adaprelora_jax.reports import step_metrics
from adaprelora_jax.tracking import track_step_metrics
from adaprelora_jax.transform import ScaleByAdaPreLoRAState
from adaprelora_jax.transform import adaprelora
from adaprelora_jax.transform import adaprelora_adamw
from adaprelora_jax.transform import decay_rate_pow
from adaprelora_jax.transform import scale_by_adaprelora

__version__ = "0.1.0"


def __getattr__(name: str):
  # adaprelora_jax.nn needs flax and adaprelora_jax.qwix needs qwix, an
  # optional dependency; the optimizer needs neither, so import them on use.
  if name in ("nn", "qwix"):
    import importlib  # noqa: PLC0415

    return importlib.import_module(f"adaprelora_jax.{name}")
  raise AttributeError(f"module 'adaprelora_jax' has no attribute {name!r}")


__all__ = (
  "FactorStep",
  "LoRADimensionNumbers",
  "LoRAPlan",
  "LoRARole",
  "STATE_LAYOUT_VERSION",
  "ScaleByAdaPreLoRAState",
  "StateLayoutError",
  "StepMetrics",
  "TIE_BREAKERS",
  "WithMetricsState",
  "adaprelora",
  "adaprelora_adamw",
  "annotate_pairing",
  "baselines",
  "check_checkpoint_layout",
  "check_state_layout",
  "decay_rate_pow",
  "dimension_numbers",
  "factor_step",
  "factor_update",
  "factored_scales",
  "lora_labels",
  "lora_plus",
  "lora_pro",
  "lora_rite",
  "nn",
  "nnx_pairing",
  "nonfinite_report",
  "pairing",
  "peft_pairing",
  "plan_pairs",
  "reports",
  "scale_by_adaprelora",
  "scale_by_lora_plus",
  "scale_by_lora_pro",
  "scale_by_lora_rite",
  "scale_by_riemannian_preconditioner",
  "scaled_adamw",
  "scaled_gd",
  "second_moments",
  "sharding",
  "step_metrics",
  "track_step_metrics",
)
