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
"""Dimension numbers: where the input, output, rank and batch axes of an N-D
LoRA pair are (qwix einsum factors, MaxText scanned layers).

:class:`LoRADimensionNumbers` declares them (through
:func:`adaprelora_jax.pairing.annotate_pairing` or
:attr:`adaprelora_jax.pairing.LoRARole.dimension_numbers`);
:func:`infer_dimension_numbers` is the rule used when none are declared.
"""

from adaprelora_jax._src.discovery.dimension_numbers import LoRADimensionNumbers
from adaprelora_jax._src.discovery.dimension_numbers import NormalizedAxes
from adaprelora_jax._src.discovery.dimension_numbers import infer_dimension_numbers
from adaprelora_jax._src.discovery.dimension_numbers import normalized

__all__ = (
  "LoRADimensionNumbers",
  "NormalizedAxes",
  "infer_dimension_numbers",
  "normalized",
)
