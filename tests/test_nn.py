"""adaprelora_jax.nn: exact statistics in the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaprelora_jax import nn


@pytest.mark.parametrize("tokens,d_in,d_out", [(3, 20, 30), (64, 5, 6)])
def test_gradient_statistics_both_paths_match_dense(tokens, d_in, d_out):
  # (3, 20, 30) takes the Gram path, (64, 5, 6) forms G.
  rng = np.random.default_rng(tokens)
  x, delta = rng.normal(size=(tokens, d_in)), rng.normal(size=(tokens, d_out))
  grad_w = x.T @ delta
  with jax.enable_x64(True):
    rows, cols = nn.gradient_statistics(jnp.asarray(x), jnp.asarray(delta))
  np.testing.assert_allclose(np.asarray(rows), np.mean(grad_w**2, axis=1), rtol=1e-10)
  np.testing.assert_allclose(np.asarray(cols), np.mean(grad_w**2, axis=0), rtol=1e-10)


def _dense_reference(layer, x, target):
  """Loss as a function of the dense LoRA product M = a @ b, and its gradient."""
  a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])

  def loss(product):
    return jnp.mean((jnp.asarray(x) @ product - target) ** 2)

  grad_w = np.asarray(jax.grad(loss)(jnp.asarray(a @ b)))
  return grad_w, a, b


@pytest.mark.parametrize("shape", [(24, 7), (2, 5, 7)])
def test_layer_gradients_carry_exact_statistics(shape):
  rng = np.random.default_rng(0)
  layer = nn.LoRA(7, 3, 4, rngs=nnx.Rngs(0), b_initializer=nnx.initializers.normal(0.5))
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  target = jnp.asarray(rng.normal(size=(*shape[:-1], 4)), jnp.float32)
  grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(layer)
  grad_w, a, b = _dense_reference(layer, x, target)
  np.testing.assert_allclose(np.asarray(grads["lora_a"][...]), grad_w @ b.T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads["lora_b"][...]), a.T @ grad_w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(grads["grad_sq_rows"][...]), np.mean(grad_w**2, axis=1), rtol=1e-4
  )
  np.testing.assert_allclose(
    np.asarray(grads["grad_sq_cols"][...]), np.mean(grad_w**2, axis=0), rtol=1e-4
  )


def test_lora_linear_matches_nnx_lora_linear():
  ours = nn.LoRALinear(
    6, 5, lora_rank=2, rngs=nnx.Rngs(3), b_initializer=nnx.initializers.normal(0.3)
  )
  theirs = nnx.LoRALinear(
    6, 5, lora_rank=2, rngs=nnx.Rngs(3), b_initializer=nnx.initializers.normal(0.3)
  )
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(
      np.asarray(getattr(ours, name)[...]), np.asarray(getattr(theirs, name)[...])
    )
  np.testing.assert_array_equal(
    np.asarray(ours.lora.lora_a[...]), np.asarray(theirs.lora.lora_a[...])
  )
  x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 6)), jnp.float32)
  np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-6)

  def loss(m):
    return jnp.sum(jnp.sin(m(x)))

  ours_grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(ours)
  theirs_grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(theirs)
  for name in ("lora_a", "lora_b"):
    np.testing.assert_allclose(
      np.asarray(ours_grads["lora"][name][...]),
      np.asarray(theirs_grads["lora"][name][...]),
      rtol=1e-5,
      atol=1e-7,
    )
  assert set(ours_grads["lora"]) == {"lora_a", "lora_b", "grad_sq_rows", "grad_sq_cols"}


def test_input_gradient_and_base_module_are_unchanged():
  base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  ours = nn.LoRA(
    4, 2, 3, base_module=base, rngs=nnx.Rngs(1), b_initializer=nnx.initializers.normal(1.0)
  )
  theirs = nnx.LoRA(
    4, 2, 3, base_module=base, rngs=nnx.Rngs(1), b_initializer=nnx.initializers.normal(1.0)
  )
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)

  def f(m, x):
    return jnp.sum(m(x) ** 3)

  np.testing.assert_allclose(
    np.asarray(jax.grad(lambda x: f(ours, x))(x)),
    np.asarray(jax.grad(lambda x: f(theirs, x))(x)),
    rtol=1e-5,
  )


def test_bfloat16_layer_gives_float32_statistics():
  layer = nn.LoRA(
    8, 2, 6, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, b_initializer=nnx.initializers.normal(0.5)
  )
  x = jnp.ones((4, 8), jnp.bfloat16)
  grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(layer)
  assert grads["lora_a"][...].dtype == jnp.bfloat16
  assert grads["grad_sq_rows"][...].dtype == jnp.float32
  assert np.all(np.asarray(grads["grad_sq_cols"][...]) > 0)


def test_stacked_layers_under_vmap_get_per_layer_statistics():
  rng = np.random.default_rng(4)
  layers, d_in, d_out, rank = 3, 5, 4, 2
  a = jnp.asarray(rng.normal(size=(layers, d_in, rank)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(layers, rank, d_out)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(layers, 10, d_in)), jnp.float32)
  rows0, cols0 = jnp.zeros((layers, d_in)), jnp.zeros((layers, d_out))

  def loss(a, b, rows, cols):
    out = jax.vmap(nn.lora_product)(x, a, b, rows, cols)
    return jnp.sum(out**2)

  _, _, rows, cols = jax.grad(loss, argnums=(0, 1, 2, 3))(a, b, rows0, cols0)
  for layer in range(layers):
    grad_w = np.asarray(x[layer]).T @ (2 * np.asarray(x[layer] @ a[layer] @ b[layer]))
    np.testing.assert_allclose(np.asarray(rows[layer]), np.mean(grad_w**2, axis=1), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(cols[layer]), np.mean(grad_w**2, axis=0), rtol=1e-4)


def test_statistics_follow_the_factor_sharding_annotations():
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  with jax.set_mesh(mesh):
    layer = nn.LoRA(
      4,
      2,
      3,
      rngs=nnx.Rngs(0),
      a_metadata={"out_sharding": ("data", None)},
      b_metadata={"out_sharding": (None, "model")},
    )
    specs = nnx.get_partition_spec(nnx.state(layer))
  assert tuple(specs["grad_sq_rows"].get_value()) == ("data",)
  assert tuple(specs["grad_sq_cols"].get_value()) == ("model",)
