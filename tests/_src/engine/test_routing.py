"""Routing (adaprelora_jax/_src/engine/routing.py): the non-LoRA leaves of an ``nnx.State``."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import adaprelora_jax as ap
from tests.optimizers import EVERY_OPTIMIZER


class HeadParam(nnx.Param):
  """A trainable non-LoRA parameter of its own Variable type (a classifier head)."""


class LoRAWithHead(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lora = nnx.LoRA(6, 2, 5, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((5,)))
    self.head = HeadParam(jax.random.normal(rngs.params(), (5, 3)))

  def __call__(self, x):
    return (self.lora(x) + self.bias) @ self.head


def _loss(model, x):
  return jnp.mean(jnp.square(model(x)))


@pytest.mark.parametrize("name", sorted(EVERY_OPTIMIZER))
def test_an_nnx_state_with_non_lora_params_trains_like_its_pure_dict(name):
  """A split ``nnx.State`` (LoRA factors plus non-LoRA Params of two Variable
  types) gets the updates of the same parameters as a plain dict, over
  several jitted steps, and the state keeps the structure init gave it."""
  model = LoRAWithHead(nnx.Rngs(0))
  graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (4, 6))

  def grads_of(params):
    if isinstance(params, dict):
      state = jax.tree.map(lambda leaf: leaf, trainable)
      nnx.replace_by_pure_dict(state, params)
      params = state
    return jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest), x))(params)

  trajectories = []
  for params in (trainable, trainable.to_pure_dict()):
    tx = EVERY_OPTIMIZER[name]()
    state = tx.init(params)
    structure = jax.tree.structure(state)
    update = jax.jit(tx.update)
    steps = []
    for _ in range(3):
      grads = grads_of(params)
      if isinstance(params, dict):
        grads = grads.to_pure_dict()
      updates, state = update(grads, state, params)
      assert jax.tree.structure(state) == structure
      params = optax.apply_updates(params, updates)
      steps.append(updates if isinstance(updates, dict) else updates.to_pure_dict())
    trajectories.append(steps)
  chex.assert_trees_all_close(*trajectories, rtol=1e-5, atol=1e-7)


def test_plan_leaves_accepts_masked_variables_and_still_rejects_other_trees():
  _, trainable, _ = nnx.split(LoRAWithHead(nnx.Rngs(0)), nnx.Param, ...)
  plan = ap.plan_pairs(trainable)
  masked = jax.tree.map(
    lambda node: optax.MaskedNode() if isinstance(node, HeadParam) else node,
    trainable,
    is_leaf=lambda node: isinstance(node, nnx.Variable),
  )
  leaves = plan.leaves(masked)
  assert sum(isinstance(leaf, optax.MaskedNode) for leaf in leaves) == 1
  with pytest.raises((ValueError, TypeError)):
    plan.leaves(trainable.to_pure_dict())
  with pytest.raises((ValueError, TypeError)):
    plan.leaves([optax.MaskedNode()] * plan.num_leaves)
