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
"""Internals of adaprelora_jax; the public API is the top-level package.

Three layers, whose imports run one way (``tests/test_import_layers.py``):

* ``discovery`` -- which leaves are LoRA pairs: pairing rules, dimension
  numbers, per-pair checks, the plan of a tree;
* ``maths`` -- the closed form and the per-pair kernels, on arrays only;
* ``engine`` -- between a tree and the kernels: finds the pairs of a plan,
  gathers them, maps a kernel over them and stores the per-pair state. It
  imports the other two, which import neither each other nor it (both use
  :mod:`adaprelora_jax._src.validation`).
"""
