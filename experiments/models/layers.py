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
"""Transformer sub-layers whose projections optionally carry LoRA.

A :class:`LoRAConfig` says which projections of which blocks get a LoRA
adapter, of which rank and layer class (``flax.nnx.LoRALinear`` or
``adaprelora_jax.nn.LoRALinear``); :func:`projection` builds either a plain
``nnx.Linear`` or that class. Base weights are ``nnx.Param`` in both cases
and the adapters are ``nnx.LoRAParam``, so ``nnx.LoRAParam`` selects exactly
the adapters.

Projection names: ``q``, ``k``, ``v``, ``o`` (attention output), ``ffn_in``,
``ffn_out``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

PROJECTIONS = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Where LoRA adapters go.

  Attributes:
    targets: projections that get an adapter, a subset of
      :data:`PROJECTIONS`.
    rank: adapter rank r.
    layer_class: ``nnx.LoRALinear`` or a drop-in replacement with the same
      constructor, e.g. ``adaprelora_jax.nn.LoRALinear``.
    blocks: indices of the transformer blocks that get adapters (all when
      ``None``). Restricting them to the top blocks lets the frozen bottom
      blocks' outputs be computed once and cached.
  """

  targets: Collection[str]
  rank: int = 8
  layer_class: type[nnx.Linear] = nnx.LoRALinear
  blocks: Collection[int] | None = None

  def __post_init__(self):
    # Frozen sets make configs hashable and order-independent.
    object.__setattr__(self, "targets", frozenset(self.targets))
    if self.blocks is not None:
      object.__setattr__(self, "blocks", frozenset(self.blocks))
    unknown = self.targets - set(PROJECTIONS)
    if unknown:
      raise ValueError(f"unknown projections {sorted(unknown)}; choose among {PROJECTIONS}")
    if self.rank < 1:
      raise ValueError(f"rank must be positive, got {self.rank}")

  def applies(self, block: int, name: str) -> bool:
    """Whether projection ``name`` of block ``block`` gets an adapter."""
    return name in self.targets and (self.blocks is None or block in self.blocks)

  def first_adapted_block(self, num_blocks: int) -> int:
    """Index of the lowest block with an adapter (``num_blocks`` if none)."""
    adapted = range(num_blocks) if self.blocks is None else self.blocks
    return min(adapted, default=num_blocks) if self.targets else num_blocks


def projection(
  in_features: int,
  out_features: int,
  *,
  name: str,
  block: int,
  lora: LoRAConfig | None,
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """A linear projection ``x @ kernel + bias`` with an adapter if configured.

  ``kernel`` is (in_features, out_features); adapters add
  ``x @ lora_a @ lora_b`` with ``lora_a`` (in_features, r) and ``lora_b``
  (r, out_features), ``lora_b = 0`` at initialization.
  """
  if lora is not None and lora.applies(block, name):
    return lora.layer_class(in_features, out_features, lora_rank=lora.rank, rngs=rngs)
  return nnx.Linear(in_features, out_features, rngs=rngs)


class MultiHeadAttention(nnx.Module):
  """Multi-head scaled dot-product attention with projections q, k, v, o."""

  def __init__(
    self, features: int, num_heads: int, *, block: int, lora: LoRAConfig | None, rngs: nnx.Rngs
  ):
    if features % num_heads:
      raise ValueError(f"{features} features do not split into {num_heads} heads")
    self.num_heads = num_heads
    for name in ("q", "k", "v", "o"):
      setattr(
        self, name, projection(features, features, name=name, block=block, lora=lora, rngs=rngs)
      )

  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, *, is_causal: bool = False
  ) -> jax.Array:
    """Attends from every position of ``x`` to every allowed position.

    Args:
      x: (B, T, D) inputs.
      mask: boolean, broadcastable to (B, heads, T, T); ``True`` = may attend.
      is_causal: also forbid attending to later positions.

    Returns:
      (B, T, D) outputs.
    """
    batch, length, features = x.shape
    heads = (batch, length, self.num_heads, features // self.num_heads)
    out = jax.nn.dot_product_attention(
      self.q(x).reshape(heads),
      self.k(x).reshape(heads),
      self.v(x).reshape(heads),
      mask=mask,
      is_causal=is_causal,
    )
    return self.o(out.reshape(x.shape))


class FeedForward(nnx.Module):
  """``ffn_out(gelu(ffn_in(x)))`` with the exact (erf) GELU."""

  def __init__(
    self,
    features: int,
    hidden_features: int,
    *,
    block: int,
    lora: LoRAConfig | None,
    rngs: nnx.Rngs,
  ):
    self.ffn_in = projection(
      features, hidden_features, name="ffn_in", block=block, lora=lora, rngs=rngs
    )
    self.ffn_out = projection(
      hidden_features, features, name="ffn_out", block=block, lora=lora, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D)."""
    return self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of (B, T, D) ``x`` over the positions where (B, T) ``mask`` is set."""
  weights = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
