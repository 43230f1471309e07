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
"""BERT encoder (all-MiniLM-L6-v2) in flax nnx, with LoRA and a classifier.

The forward pass matches ``transformers.BertModel`` in inference mode (no
dropout anywhere, so a training loss is a deterministic function of the
parameters and the batch). Typical use::

  lora = LoRAConfig(targets=("q", "v"), rank=8, layer_class=nn.LoRALinear)
  model = BertClassifier.pretrained(minilm_dir(), num_classes=5, lora=lora,
                                    rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors.numpy import load_file

from experiments.models.layers import FeedForward
from experiments.models.layers import LoRAConfig
from experiments.models.layers import MultiHeadAttention
from experiments.models.layers import masked_mean


class HeadParam(nnx.Variable):
  """Trainable parameter of a task head.

  Not an ``nnx.Param``: the frozen base weights are exactly the
  ``nnx.Param``s that are not ``nnx.LoRAParam``s, and the head stays out of
  that set.
  """


# Everything a LoRA fine-tuning run trains: adapters and the task head.
TRAINABLE = nnx.Any(nnx.LoRAParam, HeadParam)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The ``config.json`` fields the model needs (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: Path) -> BertConfig:
    """Reads a Hugging Face ``config.json`` (which must use the erf GELU)."""
    raw = json.loads(Path(path).read_text())
    if raw.get("hidden_act") != "gelu":
      raise ValueError(f"unsupported activation {raw.get('hidden_act')!r}")
    return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


class Embeddings(nnx.Module):
  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.position = nnx.Embed(config.max_position_embeddings, config.hidden_size, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs)
    self.norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, rngs=rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """(B, T) ids -> (B, T, D)."""
    positions = jnp.arange(input_ids.shape[1])
    return self.norm(
      self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
    )


class EncoderBlock(nnx.Module):
  """Post-norm block: ``x = norm(x + attention(x)); x = norm(x + ffn(x))``."""

  def __init__(self, config: BertConfig, *, block: int, lora: LoRAConfig | None, rngs: nnx.Rngs):
    d, eps = config.hidden_size, config.layer_norm_eps
    self.attention = MultiHeadAttention(
      d, config.num_attention_heads, block=block, lora=lora, rngs=rngs
    )
    self.attention_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    self.ffn = FeedForward(d, config.intermediate_size, block=block, lora=lora, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, T, D) and (B, T) bool padding mask -> (B, T, D)."""
    x = self.attention_norm(x + self.attention(x, mask[:, None, None, :]))
    return self.ffn_norm(x + self.ffn(x))


class BertEncoder(nnx.Module):
  """Embeddings and encoder blocks; returns the last hidden state."""

  def __init__(self, config: BertConfig, *, lora: LoRAConfig | None = None, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.blocks = nnx.List(
      [EncoderBlock(config, block=i, lora=lora, rngs=rngs) for i in range(config.num_hidden_layers)]
    )

  def encode(
    self, hidden: jax.Array, attention_mask: jax.Array, start: int = 0, stop: int | None = None
  ) -> jax.Array:
    """Runs blocks ``start:stop`` on (B, T, D) ``hidden``; returns (B, T, D)."""
    mask = attention_mask.astype(bool)
    for block in self.blocks[start:stop]:
      hidden = block(hidden, mask)
    return hidden

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, T) ids, mask (1 = token) and segment ids -> (B, T, D)."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    return self.encode(self.embeddings(input_ids, token_type_ids), attention_mask)

  def load_torch_weights(self, weights: dict[str, np.ndarray]) -> None:
    """Copies a ``BertModel`` state dict in; ``(out, in)`` matrices are transposed."""

    def copy(variable: nnx.Variable, name: str, transpose: bool = False):
      value = weights[name].T if transpose else weights[name]
      if value.shape != variable.shape:
        raise ValueError(f"{name}: {value.shape} does not fit {variable.shape}")
      variable[...] = jnp.asarray(value, variable.dtype)

    def linear(layer: nnx.Linear, prefix: str):
      copy(layer.kernel, f"{prefix}.weight", transpose=True)
      copy(layer.bias, f"{prefix}.bias")

    def layer_norm(layer: nnx.LayerNorm, prefix: str):
      copy(layer.scale, f"{prefix}.weight")
      copy(layer.bias, f"{prefix}.bias")

    for module, name in (
      (self.embeddings.word, "word"),
      (self.embeddings.position, "position"),
      (self.embeddings.token_type, "token_type"),
    ):
      copy(module.embedding, f"embeddings.{name}_embeddings.weight")
    layer_norm(self.embeddings.norm, "embeddings.LayerNorm")
    for i, block in enumerate(self.blocks):
      prefix = f"encoder.layer.{i}"
      attention = block.attention
      for layer, name in ((attention.q, "query"), (attention.k, "key"), (attention.v, "value")):
        linear(layer, f"{prefix}.attention.self.{name}")
      linear(attention.o, f"{prefix}.attention.output.dense")
      layer_norm(block.attention_norm, f"{prefix}.attention.output.LayerNorm")
      linear(block.ffn.ffn_in, f"{prefix}.intermediate.dense")
      linear(block.ffn.ffn_out, f"{prefix}.output.dense")
      layer_norm(block.ffn_norm, f"{prefix}.output.LayerNorm")

  @classmethod
  def pretrained(
    cls, model_dir: Path, *, lora: LoRAConfig | None = None, rngs: nnx.Rngs
  ) -> BertEncoder:
    """Builds the model of ``config.json`` and loads ``model.safetensors``."""
    model_dir = Path(model_dir)
    model = cls(BertConfig.from_json(model_dir / "config.json"), lora=lora, rngs=rngs)
    model.load_torch_weights(load_file(model_dir / "model.safetensors"))
    return model


class ClassifierHead(nnx.Module):
  """Linear map (D,) -> (num_classes,) with :class:`HeadParam` weights."""

  def __init__(self, features: int, num_classes: int, *, rngs: nnx.Rngs):
    self.kernel = HeadParam(nnx.initializers.lecun_normal()(rngs.params(), (features, num_classes)))
    self.bias = HeadParam(jnp.zeros((num_classes,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.kernel[...] + self.bias[...]


class BertClassifier(nnx.Module):
  """Pretrained encoder, masked-mean pooling and a linear head."""

  def __init__(self, encoder: BertEncoder, num_classes: int, *, rngs: nnx.Rngs):
    self.encoder = encoder
    self.head = ClassifierHead(encoder.config.hidden_size, num_classes, rngs=rngs)

  @classmethod
  def pretrained(
    cls, model_dir: Path, num_classes: int, *, lora: LoRAConfig | None = None, rngs: nnx.Rngs
  ) -> BertClassifier:
    return cls(BertEncoder.pretrained(model_dir, lora=lora, rngs=rngs), num_classes, rngs=rngs)

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
  ) -> jax.Array:
    """(B, T) ids and mask -> (B, num_classes) logits."""
    return self.head(
      masked_mean(self.encoder(input_ids, attention_mask, token_type_ids), attention_mask)
    )

  def from_hidden(self, hidden: jax.Array, attention_mask: jax.Array, start: int) -> jax.Array:
    """Logits from (B, T, D) hidden states cached after blocks ``:start``.

    Exact when blocks ``:start`` have no adapter (see
    :meth:`LoRAConfig.first_adapted_block`): cache
    ``encoder.encode(encoder.embeddings(ids, types), mask, stop=start)`` once,
    then train on it.
    """
    return self.head(
      masked_mean(self.encoder.encode(hidden, attention_mask, start), attention_mask)
    )


def load_tokenizer(model_dir: Path, length: int) -> tokenizers.Tokenizer:
  """The model's WordPiece tokenizer, padding and truncating to ``length``."""
  tokenizer = tokenizers.Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
  tokenizer.enable_padding(length=length)
  tokenizer.enable_truncation(length)
  return tokenizer


def tokenize(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """``input_ids``, ``attention_mask``, ``token_type_ids``: (N, T) int32 each."""
  encodings = tokenizer.encode_batch(list(texts))
  return {
    name: np.asarray([getattr(e, attribute) for e in encodings], np.int32)
    for name, attribute in (
      ("input_ids", "ids"),
      ("attention_mask", "attention_mask"),
      ("token_type_ids", "type_ids"),
    )
  }
