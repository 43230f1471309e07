"""LoRA transfer on scikit-learn's handwritten digits (fast, real data).

A small MLP is pretrained (fixed seed, AdamW, all parameters) on digits 0-4;
LoRA adapters on its two hidden layers and a fresh head are then trained on
digits 5-9. Small enough for tests and checkpoint/resume checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adaprelora_jax import nn as lora_nn
from experiments.tasks.base import Budget
from experiments.tasks.base import Task
from experiments.tasks.base import example_order
from experiments.tasks.base import limit

HIDDEN = 128
RANK = 4
BATCH = 64


class MLP(nnx.Module):
  """64 pixels → 128 → 128 → classes; LoRA on the hidden layers.

  Args:
    classes: number of output classes.
    lora_layer: ``nnx.LoRALinear`` or ``adaprelora_jax.nn.LoRALinear``.
    rank: LoRA rank.
    rngs: random generators.
  """

  def __init__(self, classes: int, *, lora_layer=nnx.LoRALinear, rank: int = RANK, rngs: nnx.Rngs):
    self.hidden1 = lora_layer(64, HIDDEN, lora_rank=rank, rngs=rngs)
    self.hidden2 = lora_layer(HIDDEN, HIDDEN, lora_rank=rank, rngs=rngs)
    self.head = nnx.Linear(HIDDEN, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(batch, 64) pixels in [0, 1] → (batch, classes) logits."""
    return self.head(jax.nn.gelu(self.hidden2(jax.nn.gelu(self.hidden1(x)))))


def classification_loss(model: nnx.Module, batch) -> jax.Array:
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@functools.cache
def digits_split(labels: tuple[int, ...]):
  """(train, test) arrays of the digits with the given labels, relabelled 0..k-1."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  data = load_digits()
  keep = np.isin(data.target, labels)
  x = (data.data[keep] / 16.0).astype(np.float32)
  y = np.searchsorted(np.asarray(labels), data.target[keep]).astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  split = int(0.8 * len(y))
  return (x[:split], y[:split]), (x[split:], y[split:])


SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


@functools.cache
def pretrained_base() -> dict[str, np.ndarray]:
  """Hidden-layer weights of the MLP trained on digits 0-4 (deterministic)."""
  (x, y), _ = digits_split(SOURCE)
  model = MLP(len(SOURCE), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  batch = (jnp.asarray(x), jnp.asarray(y))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(classification_loss)(model, batch))

  for _ in range(150):
    step(model, optimizer)
  return {
    f"{layer}/{name}": np.asarray(getattr(getattr(model, layer), name)[...])
    for layer in ("hidden1", "hidden2")
    for name in ("kernel", "bias")
  }


TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))


def prepare(budget: Budget) -> None:
  # Pretrains the base MLP on digits 0-4 (~4 s on two cores); pretrained_base
  # keeps it for every later run in the process.
  del budget
  pretrained_base()


def build_model(seed: int, exact_statistics: bool):
  layer = lora_nn.LoRALinear if exact_statistics else nnx.LoRALinear
  model = MLP(len(TARGET), lora_layer=layer, rngs=nnx.Rngs(seed))
  for key, value in pretrained_base().items():
    layer_name, name = key.split("/")
    getattr(getattr(model, layer_name), name)[...] = jnp.asarray(value)
  return model, TRAINABLE


def train_batch(seed: int, step: int, budget: Budget):
  (x, y), _ = digits_split(TARGET)
  index = example_order(limit(len(y), budget.max_train_examples), seed, step, BATCH)
  return jnp.asarray(x[index]), jnp.asarray(y[index])


def evaluate(model: nnx.Module, budget: Budget) -> dict[str, float]:
  _, (x, y) = digits_split(TARGET)
  count = limit(len(y), budget.max_eval_examples)
  x, y = x[:count], y[:count]
  logits = model(jnp.asarray(x))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
  return {"accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y)), "loss": float(loss)}


TASK = Task(
  name="digits",
  model="MLP 64-128-128 pretrained on digits 0-4 (in-project, fixed seed)",
  dataset="scikit-learn load_digits, digits 5-9 (80/20 split)",
  metric="accuracy",
  higher_is_better=True,
  presets={
    "smoke": Budget(steps=30, eval_every=10, seeds=1, checkpoint_every=10),
    "full": Budget(steps=300, eval_every=25, seeds=3, checkpoint_every=100),
  },
  build_model=build_model,
  train_batch=train_batch,
  loss_fn=classification_loss,
  evaluate=evaluate,
  prepare=prepare,
)
