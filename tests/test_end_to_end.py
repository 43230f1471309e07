"""End to end: LoRA transfer on real data (scikit-learn digits) with nnx."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import adaprelora_jax as ap
from adaprelora_jax import nn
from experiments.tasks.digits import TARGET
from experiments.tasks.digits import TRAINABLE
from experiments.tasks.digits import build_model
from experiments.tasks.digits import classification_loss
from experiments.tasks.digits import digits_split
from experiments.tasks.digits import pretrained_base


def _transfer_model(lora_layer):
  return build_model(1, exact_statistics=lora_layer is nn.LoRALinear)[0]


def _train(model, tx, x, y, steps):
  optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(classification_loss, argnums=nnx.DiffState(0, TRAINABLE))(
      model, (x, y)
    )
    optimizer.update(model, grads)
    return loss

  return [float(step(model, optimizer)) for _ in range(steps)], optimizer


@pytest.mark.parametrize(
  "lora_layer", [nnx.LoRALinear, nn.LoRALinear], ids=["tangent-statistics", "exact-statistics"]
)
def test_lora_transfer_on_digits(lora_layer):
  (x, y), (x_test, y_test) = digits_split(TARGET)
  model = _transfer_model(lora_layer)
  # Without momentum (b1=None, as Adafactor) steps much above 1e-2 spike on
  # this task, as RMSprop (AdamW with b1=0) does.
  losses, optimizer = _train(model, ap.adaprelora(1e-2), jnp.asarray(x), jnp.asarray(y), 120)
  accuracy = float(jnp.mean(jnp.argmax(model(jnp.asarray(x_test)), -1) == y_test))
  assert losses[-1] < 0.25 * losses[0]
  assert accuracy > 0.9
  # Base weights are frozen; the statistics probes stay zero.
  np.testing.assert_array_equal(
    np.asarray(model.hidden1.kernel[...]), pretrained_base()["hidden1/kernel"]
  )
  if lora_layer is nn.LoRALinear:
    assert np.all(np.asarray(model.hidden1.lora.grad_sq_rows[...]) == 0.0)
  assert (
    ap.nonfinite_report(nnx.as_pure(optimizer.opt_state), nnx.as_pure(nnx.state(model, TRAINABLE)))
    == {}
  )


def test_adamw_variant_transfers_on_digits_with_exact_statistics():
  (x, y), (x_test, y_test) = digits_split(TARGET)
  model = _transfer_model(nn.LoRALinear)
  tx = ap.adaprelora_adamw(3e-3, statistics="exact")
  losses, _ = _train(model, tx, jnp.asarray(x), jnp.asarray(y), 120)
  accuracy = float(jnp.mean(jnp.argmax(model(jnp.asarray(x_test)), -1) == y_test))
  assert losses[-1] < 0.25 * losses[0]
  assert accuracy > 0.9
  assert np.all(np.asarray(model.hidden1.lora.grad_sq_rows[...]) == 0.0)


@pytest.mark.parametrize(
  "make_tx",
  [
    lambda: ap.adaprelora(3e-2, b1=0.9, weight_decay=1e-3),
    lambda: ap.adaprelora_adamw(3e-3, weight_decay=1e-3),
  ],
  ids=["adaprelora", "adaprelora_adamw"],
)
def test_orbax_checkpoint_resumes_bit_for_bit(tmp_path, make_tx):
  (x, y), _ = digits_split(TARGET)
  x, y = jnp.asarray(x[:256]), jnp.asarray(y[:256])
  tx = make_tx()

  def fresh():
    model = _transfer_model(nn.LoRALinear)
    return model, nnx.Optimizer(model, tx, wrt=TRAINABLE)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(classification_loss, argnums=nnx.DiffState(0, TRAINABLE))(model, (x, y))
    optimizer.update(model, grads)

  model, optimizer = fresh()
  for _ in range(5):
    step(model, optimizer)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(
    tmp_path / "ckpt", {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
  )
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

  chex.assert_trees_all_equal(nnx.state(restored_model), nnx.state(model))
  chex.assert_trees_all_equal(nnx.state(restored_optimizer), nnx.state(optimizer))
