"""A small Llama 3 (``tunix.models.llama3``) over characters, for CPU studies.

The architecture is Tunix's own ``Llama3`` class (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP, untied head); only the size is ours. Tunix initializes
the MLP kernels to zero, which is a saddle training cannot leave (the gate,
up and down projections all receive zero gradient), so :func:`build`
re-initializes every matrix GPT-2 style: normal(0.02), the two projections
that write into the residual stream scaled by ``1/sqrt(2 * num_layers)``.

Checkpoints are safetensors files of float16 base weights (names are the
``/``-joined parameter paths) whose metadata holds the config and the
vocabulary, so a file rebuilds its model and data encoding alone. Everything
runs under :func:`mesh`, the one-device mesh with Tunix's axis names: the
models annotate their variables with those names.
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
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open
from tunix.models.llama3 import model as llama3

_CONFIG_KEY = "config"
_VOCAB_KEY = "vocab"
# Written to the residual stream: scaled down with depth (GPT-2).
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LlamaSize:
  """The size fields of ``llama3.ModelConfig`` that the studies vary.

  Attributes:
    vocab_size: number of character ids (with UNK).
    num_layers: decoder layers.
    embed_dim: width of the residual stream.
    hidden_dim: width of the SwiGLU MLP.
    num_heads: query heads.
    head_dim: width of each head.
    num_kv_heads: key/value heads (grouped-query attention).
  """

  vocab_size: int
  num_layers: int = 4
  embed_dim: int = 256
  hidden_dim: int = 512
  num_heads: int = 4
  head_dim: int = 64
  num_kv_heads: int = 2

  def model_config(self) -> llama3.ModelConfig:
    return llama3.ModelConfig(**dataclasses.asdict(self), rope_theta=10_000, norm_eps=1e-6)


def mesh() -> jax.sharding.Mesh:
  """One CPU device on Tunix's default axes ("fsdp", "tp")."""
  return jax.make_mesh(
    (1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:1]
  )


def _flat_params(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def parameter_count(model: nnx.Module) -> int:
  """Number of base (non-LoRA) parameters."""
  return sum(variable.size for key, variable in _flat_params(model) if not _is_lora(key))


def _name(key: tuple) -> str:
  return "/".join(map(str, key))


def build(size: LlamaSize, seed: int) -> llama3.Llama3:
  """A freshly initialized model (see the module docstring); call under :func:`mesh`."""
  model = llama3.Llama3(size.model_config(), rngs=nnx.Rngs(seed))
  keys = jax.random.split(jax.random.key(seed), len(_flat_params(model)))
  for key, (path, variable) in zip(keys, _flat_params(model), strict=True):
    if variable.ndim >= 2:
      scale = 0.02 / (
        math.sqrt(2 * size.num_layers) if any(name in path for name in _RESIDUAL_OUTPUTS) else 1.0
      )
      variable.value = scale * jax.random.normal(key, variable.shape, variable.dtype)
  return model


def model_input(windows: jax.Array) -> dict[str, jax.Array]:
  """Positions and causal mask of unpadded (B, L) windows, in Tunix's layout.

  Every token is real: id 0 is the UNK character, not padding, so the mask
  is not derived from the ids as Tunix's recipes do for padded batches.
  """
  batch, length = windows.shape
  return {
    "positions": jnp.broadcast_to(jnp.arange(length), (batch, length)),
    "attention_mask": jnp.broadcast_to(
      jnp.tril(jnp.ones((length, length), bool)), (batch, length, length)
    ),
  }


def next_token_nats(model: llama3.Llama3, windows: jax.Array) -> jax.Array:
  """(B, L - 1) negative log-likelihood of ``windows[:, 1:]`` given the prefix."""
  inputs = model_input(windows)
  logits, _ = model(windows, inputs["positions"], None, inputs["attention_mask"])
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]


@nnx.jit
def _nats_sum(model: llama3.Llama3, windows: jax.Array) -> jax.Array:
  return next_token_nats(model, windows).sum()


def bits_per_char(model: llama3.Llama3, windows: np.ndarray, batch_size: int = 32) -> float:
  """Mean bits per predicted character over (N, L) windows (N a multiple of ``batch_size``)."""
  if len(windows) % batch_size:
    raise ValueError(f"{len(windows)} windows are not a multiple of batch {batch_size}")
  total = sum(
    float(_nats_sum(model, jnp.asarray(windows[start : start + batch_size])))
    for start in range(0, len(windows), batch_size)
  )
  return total / (windows.shape[0] * (windows.shape[1] - 1) * math.log(2))


def save(model: llama3.Llama3, size: LlamaSize, path: Path, vocab_chars: str) -> None:
  """Writes the base weights (float16; not adapters), size and vocabulary to ``path``."""
  arrays = {
    _name(key): np.asarray(variable.value, np.float16)
    for key, variable in _flat_params(model)
    if not _is_lora(key)
  }
  safetensors_numpy.save_file(
    arrays,
    str(path),
    metadata={_CONFIG_KEY: json.dumps(dataclasses.asdict(size)), _VOCAB_KEY: vocab_chars},
  )


def _is_lora(key: tuple) -> bool:
  return any(str(part).endswith(("_lora_a", "_lora_b")) for part in key)


def load(path: Path) -> tuple[llama3.Llama3, LlamaSize, str]:
  """Rebuilds a saved model (float32 weights); call under :func:`mesh`.

  Returns:
    The model, its size and its vocabulary characters (see
    ``experiments.data.CharVocab``).

  Raises:
    ValueError: the file's tensors are not exactly those of its config.
  """
  with safe_open(str(path), framework="numpy") as saved:
    metadata = saved.metadata()
    arrays = {name: saved.get_tensor(name) for name in saved.keys()}
  size = LlamaSize(**json.loads(metadata[_CONFIG_KEY]))
  model = build(size, seed=0)
  params = _flat_params(model)
  names = {_name(key) for key, _ in params}
  if names != set(arrays):
    raise ValueError(
      f"{path} does not match {size}: missing {sorted(names - set(arrays))}, "
      f"unexpected {sorted(set(arrays) - names)}"
    )
  for key, variable in params:
    variable.value = jnp.asarray(arrays[_name(key)], jnp.float32)
  return model, size, metadata[_VOCAB_KEY]
