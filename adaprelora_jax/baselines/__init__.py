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
"""The LoRA optimizers AdaPreLoRA is compared with, as optax transforms.

Every optimizer takes the same pairing options as
:func:`adaprelora_jax.adaprelora` (``pairing=``, ``non_lora=``, ``strict=``),
so switching is one line::

  tx = adaprelora_jax.lora_rite(1e-3)   # or lora_plus, scaled_adamw, ...

* :func:`lora_plus` / :func:`scale_by_lora_plus` -- LoRA+ (Hayou et al.).
* :func:`scaled_gd`, :func:`scaled_adamw` /
  :func:`scale_by_riemannian_preconditioner` -- Riemannian preconditioned
  LoRA (Zhang and Pilanci).
* :func:`lora_pro` / :func:`scale_by_lora_pro` -- LoRA-Pro (Wang et al.).
* :func:`lora_rite` / :func:`scale_by_lora_rite` -- LoRA-RITE (Yen et al.).

Plain LoRA with AdamW or Adafactor is ``optax.adamw`` / ``optax.adafactor``.
"""

from adaprelora_jax.baselines.lora_plus import lora_plus
from adaprelora_jax.baselines.lora_plus import scale_by_lora_plus
from adaprelora_jax.baselines.lora_pro import ScaleByLoRAProState
from adaprelora_jax.baselines.lora_pro import lora_pro
from adaprelora_jax.baselines.lora_pro import scale_by_lora_pro
from adaprelora_jax.baselines.lora_rite import ScaleByLoRARiteState
from adaprelora_jax.baselines.lora_rite import lora_rite
from adaprelora_jax.baselines.lora_rite import scale_by_lora_rite
from adaprelora_jax.baselines.riemannian import ScaleByRiemannianPreconditionerState
from adaprelora_jax.baselines.riemannian import scale_by_riemannian_preconditioner
from adaprelora_jax.baselines.riemannian import scaled_adamw
from adaprelora_jax.baselines.riemannian import scaled_gd

__all__ = (
  "ScaleByLoRAProState",
  "ScaleByLoRARiteState",
  "ScaleByRiemannianPreconditionerState",
  "lora_plus",
  "lora_pro",
  "lora_rite",
  "scale_by_lora_plus",
  "scale_by_lora_pro",
  "scale_by_lora_rite",
  "scale_by_riemannian_preconditioner",
  "scaled_adamw",
  "scaled_gd",
)
