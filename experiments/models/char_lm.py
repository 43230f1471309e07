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
"""A small decoder-only character transformer, pretrainable on CPU.

Pre-norm GPT-style blocks with causal attention, learned positions and an
untied output projection. The same :class:`LoRAConfig` as the BERT model
injects adapters. Weights are saved as a flat ``.npz`` (names are the
``/``-joined parameter paths) holding the config and the vocabulary, so a
checkpoint rebuilds its model and data encoding without other files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.models.layers import FeedForward
from experiments.models.layers import LoRAConfig
from experiments.models.layers import MultiHeadAttention

_CONFIG_KEY = "__config__"
_VOCAB_KEY = "__vocab__"


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
  """Model size.

  Attributes:
    vocab_size: number of character ids (with UNK).
    features: width D of the residual stream.
    num_layers: decoder blocks.
    num_heads: attention heads (D must be divisible by it).
    hidden_features: width of the feed-forward layer.
    max_length: longest input; one learned position embedding each.
  """

  vocab_size: int
  features: int = 128
  num_layers: int = 4
  num_heads: int = 4
  hidden_features: int = 512
  max_length: int = 128


class DecoderBlock(nnx.Module):
  """``x += attention(norm(x))`` (causal), then ``x += ffn(norm(x))``."""

  def __init__(self, config: CharLMConfig, *, block: int, lora: LoRAConfig | None, rngs: nnx.Rngs):
    d = config.features
    self.attention_norm = nnx.LayerNorm(d, rngs=rngs)
    self.attention = MultiHeadAttention(d, config.num_heads, block=block, lora=lora, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(d, rngs=rngs)
    self.ffn = FeedForward(d, config.hidden_features, block=block, lora=lora, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, D)."""
    x = x + self.attention(self.attention_norm(x), is_causal=True)
    return x + self.ffn(self.ffn_norm(x))


class CharLM(nnx.Module):
  """Next-character model: (B, T) ids -> (B, T, vocab_size) logits."""

  def __init__(self, config: CharLMConfig, *, lora: LoRAConfig | None = None, rngs: nnx.Rngs):
    self.config = config
    embed_init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(config.vocab_size, config.features, embedding_init=embed_init, rngs=rngs)
    self.position = nnx.Embed(
      config.max_length, config.features, embedding_init=embed_init, rngs=rngs
    )
    self.blocks = nnx.List(
      [DecoderBlock(config, block=i, lora=lora, rngs=rngs) for i in range(config.num_layers)]
    )
    self.final_norm = nnx.LayerNorm(config.features, rngs=rngs)
    self.unembed = nnx.Linear(config.features, config.vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.unembed(self.final_norm(x))


def next_token_nats(model: CharLM, windows: jax.Array) -> jax.Array:
  """(B, T) cross-entropies (nats) of (B, T + 1) windows' last T tokens."""
  log_probs = jax.nn.log_softmax(model(windows[:, :-1]).astype(jnp.float32))
  # A one-hot product rather than a gather: the gather's gradient is a
  # scatter, which made the whole training step about 1.8x slower on CPU.
  targets = jax.nn.one_hot(windows[:, 1:], log_probs.shape[-1], dtype=log_probs.dtype)
  return -jnp.sum(log_probs * targets, axis=-1)


@nnx.jit
def _total_nats(model: CharLM, windows: jax.Array) -> jax.Array:
  return jnp.sum(next_token_nats(model, windows))


def bits_per_char(model: CharLM, windows: np.ndarray, batch_size: int = 256) -> float:
  """Mean next-character bits over (N, T + 1) windows (e.g. ``lm_eval_windows``).

  Windows are evaluated in equal-shape batches (one compilation); a last
  partial batch is evaluated on its own.
  """
  total = sum(
    float(_total_nats(model, jnp.asarray(windows[i : i + batch_size])))
    for i in range(0, len(windows), batch_size)
  )
  return total / (windows.shape[0] * (windows.shape[1] - 1) * math.log(2))


_FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def save(model: CharLM, path: Path, vocab_chars: str, dtype: np.dtype = np.float32) -> None:
  """Writes the base weights (not adapters), config and vocabulary to ``path``."""
  arrays = {
    "/".join(map(str, key)): np.asarray(variable[...], dtype)
    for key, variable in nnx.to_flat_state(nnx.state(model, _FROZEN))
  }
  arrays[_CONFIG_KEY] = np.asarray(json.dumps(dataclasses.asdict(model.config)))
  arrays[_VOCAB_KEY] = np.asarray(vocab_chars)
  np.savez_compressed(path, **arrays)


def load(path: Path, *, lora: LoRAConfig | None = None, rngs: nnx.Rngs) -> tuple[CharLM, str]:
  """Rebuilds a saved model, with fresh adapters if ``lora`` is given.

  Returns:
    The model (float32 weights) and its vocabulary characters (see
    ``experiments.data.CharVocab``).
  """
  with np.load(path, allow_pickle=False) as saved:
    arrays = dict(saved)
  config = CharLMConfig(**json.loads(str(arrays.pop(_CONFIG_KEY))))
  vocab_chars = str(arrays.pop(_VOCAB_KEY))
  model = CharLM(config, lora=lora, rngs=rngs)
  keys = [key for key, _ in nnx.to_flat_state(nnx.state(model, _FROZEN))]
  names = ["/".join(map(str, key)) for key in keys]
  if set(names) != set(arrays):
    raise ValueError(
      f"{path} does not match {config}: missing "
      f"{sorted(set(names) - set(arrays))}, unexpected "
      f"{sorted(set(arrays) - set(names))}"
    )
  nnx.update(
    model,
    nnx.from_flat_state(
      [(key, jnp.asarray(arrays[name], jnp.float32)) for key, name in zip(keys, names, strict=True)]
    ),
  )
  return model, vocab_chars
