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
"""Checks of hyperparameters when a transform is built.

A misconfigured optimizer does not fail by itself: a negative decay makes
the second moments negative and every step is skipped, ``b1 = 1`` divides
by a zero bias correction. Every public transform therefore checks its
hyperparameters when it is constructed and raises a ``ValueError`` that
names the parameter.

Only values known on the host are checked: Python and NumPy numbers. JAX
arrays are left alone, because that is how ``optax.inject_hyperparams``
passes hyperparameters (cast to the parameters' dtype, so ``b2 = 0.999``
arrives as 1.0 for bfloat16 parameters) and how traced values arrive;
callables are schedules, evaluated only later.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax


def _host_number(value: Any) -> float | None:
  """``value`` as a float if it is a number known on the host, else None."""
  if callable(value) or isinstance(value, jax.Array):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _out_of_range(name: str, value: Any, requirement: str, allow_none: bool) -> ValueError:
  return ValueError(
    f"{name} must be {requirement}{' or None' if allow_none else ''}, got {value!r}."
  )


def _number_to_check(name: str, value: Any, requirement: str, allow_none: bool) -> float | None:
  """The number to compare with the bounds, or None if there is none to check."""
  if value is None:
    if allow_none:
      return None
    raise _out_of_range(name, value, requirement, allow_none)
  return _host_number(value)


def check_positive(
  name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False
) -> None:
  """Raises if ``value`` is not ``> 0`` (``>= 0`` with ``allow_zero``).

  Args:
    name: the parameter name, for the error message.
    value: the value; JAX arrays and callables are not checked (module
      docstring).
    allow_zero: accept 0.
    allow_none: accept None (an optional feature that is off).

  Raises:
    ValueError: if the value is out of range (NaN included), naming ``name``.
  """
  requirement = ">= 0" if allow_zero else "> 0"
  number = _number_to_check(name, value, requirement, allow_none)
  # `not (x > 0)` rather than `x <= 0`, so that NaN fails too.
  if number is not None and not (number >= 0.0 if allow_zero else number > 0.0):
    raise _out_of_range(name, value, requirement, allow_none)


def check_in_range(
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  include_low: bool = True,
  include_high: bool = False,
  allow_none: bool = False,
) -> None:
  """Raises if ``value`` is not in the interval from ``low`` to ``high``.

  The default interval, ``[low, high)``, is the one of EMA decay rates.

  Args:
    name: the parameter name, for the error message.
    value: the value; JAX arrays and callables are not checked (module
      docstring).
    low: the lower bound.
    high: the upper bound.
    include_low: whether ``low`` itself is allowed.
    include_high: whether ``high`` itself is allowed.
    allow_none: accept None (an optional feature that is off).

  Raises:
    ValueError: if the value is out of range (NaN included), naming ``name``.
  """
  interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
  number = _number_to_check(name, value, f"in {interval}", allow_none)
  if number is None:
    return
  # Comparisons with NaN are False, so NaN is outside every interval.
  above = number >= low if include_low else number > low
  below = number <= high if include_high else number < high
  if not (above and below):
    raise _out_of_range(name, value, f"in {interval}", allow_none)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
  """Raises if ``value`` is not one of ``choices``.

  Args:
    name: the parameter name, for the error message.
    value: the value.
    choices: the allowed values.

  Raises:
    ValueError: if ``value`` is not among ``choices``, naming ``name``.
  """
  if value not in choices:
    listed = ", ".join(repr(choice) for choice in choices)
    raise ValueError(f"{name} must be one of {listed}, got {value!r}.")
