"""End to end: LoRA transfer on real data (scikit-learn digits) with nnx."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import adaprelora_jax as ap
from adaprelora_jax import nn


class MLP(nnx.Module):
  """64 → 128 → 128 → classes, LoRA on both hidden layers, plain head."""

  def __init__(self, classes, *, lora_layer=nnx.LoRALinear, rank=4, rngs):
    self.hidden1 = lora_layer(64, 128, lora_rank=rank, rngs=rngs)
    self.hidden2 = lora_layer(128, 128, lora_rank=rank, rngs=rngs)
    self.head = nnx.Linear(128, classes, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.gelu(self.hidden2(jax.nn.gelu(self.hidden1(x)))))


@functools.lru_cache(maxsize=None)
def _digits():
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  return x, data.target


def _task(labels):
  x, y = _digits()
  keep = np.isin(y, labels)
  x, y = x[keep], np.searchsorted(labels, y[keep])
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  split = int(0.8 * len(y))
  return (x[:split], y[:split]), (x[split:], y[split:])


def _loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.lru_cache(maxsize=None)
def _pretrained_base():
  """Base MLP trained on digits 0-4 with AdamW (all params)."""
  (x, y), _ = _task(np.arange(5))
  model = MLP(5, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(_loss)(model, x, y)
    optimizer.update(model, grads)

  for _ in range(150):
    step(model, optimizer)
  return nnx.state(model, nnx.Param)


def _transfer_model(lora_layer):
  model = MLP(5, lora_layer=lora_layer, rngs=nnx.Rngs(1))
  base = _pretrained_base()
  for name in ("hidden1", "hidden2"):
    getattr(model, name).kernel[...] = base[name]["kernel"][...]
    getattr(model, name).bias[...] = base[name]["bias"][...]
  return model


TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))


def _train(model, tx, x, y, steps):
  optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, TRAINABLE))(model, x, y)
    optimizer.update(model, grads)
    return loss

  return [float(step(model, optimizer)) for _ in range(steps)], optimizer


@pytest.mark.parametrize("lora_layer", [nnx.LoRALinear, nn.LoRALinear],
                         ids=["tangent-statistics", "exact-statistics"])
def test_lora_transfer_on_digits(lora_layer):
  (x, y), (x_test, y_test) = _task(np.arange(5, 10))
  model = _transfer_model(lora_layer)
  # Without momentum (b1=None, as Adafactor) steps much above 1e-2 spike on
  # this task, as RMSprop (AdamW with b1=0) does.
  losses, optimizer = _train(model, ap.adaprelora(1e-2), jnp.asarray(x), jnp.asarray(y), 120)
  accuracy = float(jnp.mean(jnp.argmax(model(jnp.asarray(x_test)), -1) == y_test))
  assert losses[-1] < 0.25 * losses[0]
  assert accuracy > 0.9
  # Base weights are frozen; the statistics probes stay zero.
  np.testing.assert_array_equal(np.asarray(model.hidden1.kernel[...]),
                                np.asarray(_pretrained_base()["hidden1"]["kernel"][...]))
  if lora_layer is nn.LoRALinear:
    assert np.all(np.asarray(model.hidden1.lora.grad_sq_rows[...]) == 0.0)
  assert ap.nonfinite_report(nnx.as_pure(optimizer.opt_state),
                             nnx.as_pure(nnx.state(model, TRAINABLE))) == {}


def test_orbax_checkpoint_resumes_bit_for_bit(tmp_path):
  (x, y), _ = _task(np.arange(5, 10))
  x, y = jnp.asarray(x[:256]), jnp.asarray(y[:256])
  tx = ap.adaprelora(3e-2, b1=0.9, weight_decay=1e-3)

  def fresh():
    model = _transfer_model(nn.LoRALinear)
    return model, nnx.Optimizer(model, tx, wrt=TRAINABLE)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, TRAINABLE))(model, x, y)
    optimizer.update(model, grads)

  model, optimizer = fresh()
  for _ in range(5):
    step(model, optimizer)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
  checkpointer.wait_until_finished()
  for _ in range(4):
    step(model, optimizer)

  restored_model, restored_optimizer = fresh()
  target = {"model": nnx.state(restored_model), "optimizer": nnx.state(restored_optimizer)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  nnx.update(restored_model, restored["model"])
  nnx.update(restored_optimizer, restored["optimizer"])
  for _ in range(4):
    step(restored_model, restored_optimizer)

  for got, expected in zip(jax.tree.leaves(nnx.state(restored_model)),
                           jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  for got, expected in zip(jax.tree.leaves(nnx.state(restored_optimizer)),
                           jax.tree.leaves(nnx.state(optimizer))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
