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
"""Pairing rules: which leaves of a parameter tree are LoRA factors.

A pairing function ``(path: tuple[str, ...], leaf) -> LoRARole | None`` says
whether one leaf is a LoRA factor (or an exact-statistics probe), which pair
it belongs to and its role. The presets are :func:`nnx_pairing` (flax nnx and
qwix names, the default ``"nnx"``) and :func:`peft_pairing` (``"peft"``);
:func:`annotate_pairing` adds per-pair dimension numbers and LoRA scales to
any of them. Every optimizer of this package takes one as ``pairing=``.
"""

from adaprelora_jax._src.discovery.annotation import annotate_pairing
from adaprelora_jax._src.discovery.dimension_numbers import LoRADimensionNumbers
from adaprelora_jax._src.discovery.pairing import COL_STATS_NAME
from adaprelora_jax._src.discovery.pairing import ROW_STATS_NAME
from adaprelora_jax._src.discovery.pairing import LoRARole
from adaprelora_jax._src.discovery.pairing import Pairing
from adaprelora_jax._src.discovery.pairing import PairingFn
from adaprelora_jax._src.discovery.pairing import Role
from adaprelora_jax._src.discovery.pairing import Statistics
from adaprelora_jax._src.discovery.pairing import format_path
from adaprelora_jax._src.discovery.pairing import nnx_pairing
from adaprelora_jax._src.discovery.pairing import path_names
from adaprelora_jax._src.discovery.pairing import peft_pairing
from adaprelora_jax._src.discovery.pairing import resolve_pairing

__all__ = (
  "COL_STATS_NAME",
  "LoRADimensionNumbers",
  "LoRARole",
  "Pairing",
  "PairingFn",
  "ROW_STATS_NAME",
  "Role",
  "Statistics",
  "annotate_pairing",
  "format_path",
  "nnx_pairing",
  "path_names",
  "peft_pairing",
  "resolve_pairing",
)
