"""The optimizer state keeps its dtypes and shapes across updates, for every
public transform and parameter dtype (as optax's ``test_state_dtype``), so it
can be the carry of ``jax.lax.scan`` and ``jit`` does not retrace."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaprelora_jax as ap
from tests.test_validation import public_transforms


def _with_head(core: optax.GradientTransformation) -> optax.GradientTransformation:
  """A ``scale_by_*`` core, which owns the LoRA factors only, beside an Adam
  for the problem's head (as the aliases route it)."""
  return optax.partition({"lora": core, "non_lora": optax.scale_by_adam()}, ap.lora_labels())


# name -> transform, for every public transform and each kind of state
# (momentum, escape mass, LoRA-Pro's two modes, injected hyperparameters).
_OPTAX_VERSION = tuple(int(part) for part in optax.__version__.split(".")[:3])

TRANSFORMS = {
  "adaprelora": lambda: ap.adaprelora(1e-2),
  "adaprelora_momentum": lambda: ap.adaprelora(1e-2, b1=0.9, weight_decay=1e-3),
  "adaprelora_injected": lambda: optax.inject_hyperparams(ap.adaprelora)(
    learning_rate=1e-2, b1=0.9
  ),
  "scale_by_adaprelora": lambda: _with_head(ap.scale_by_adaprelora()),
  "adaprelora_adamw": lambda: ap.adaprelora_adamw(1e-2, weight_decay=1e-3),
  "adaprelora_adamw_surrogate_mu_bf16": lambda: ap.adaprelora_adamw(
    1e-2, statistics="surrogate", mu_dtype=jnp.bfloat16
  ),
  "adaprelora_adamw_injected": lambda: optax.inject_hyperparams(ap.adaprelora_adamw)(
    learning_rate=1e-2, b1=0.9, b2=0.99
  ),
  "lora_plus": lambda: ap.lora_plus(1e-2),
  "scale_by_lora_plus": lambda: ap.scale_by_lora_plus(16.0),
  "scaled_gd": lambda: ap.scaled_gd(1e-2),
  "scaled_adamw": lambda: ap.scaled_adamw(1e-2),
  "scale_by_riemannian_preconditioner": lambda: _with_head(ap.scale_by_riemannian_preconditioner()),
  "lora_pro": lambda: ap.lora_pro(1e-2),
  "lora_pro_full": lambda: ap.lora_pro(1e-2, mode="full"),
  "scale_by_lora_pro": lambda: _with_head(ap.scale_by_lora_pro()),
  "scale_by_lora_pro_full": lambda: _with_head(ap.scale_by_lora_pro("full")),
  "lora_rite": lambda: ap.lora_rite(1e-2),
  "lora_rite_escape_mass": lambda: ap.lora_rite(1e-2, escape_mass=True),
  "scale_by_lora_rite": lambda: _with_head(ap.scale_by_lora_rite()),
  "adaprelora_metrics": lambda: ap.adaprelora(1e-2, metrics=True),
  "lora_rite_metrics": lambda: ap.lora_rite(1e-2, metrics=True),
  "track_step_metrics": ap.track_step_metrics,
}

# (parameter dtype, x64): float32 under x64 too, where float64 hyperparameter
# arithmetic (Adafactor's decay schedule) must not widen float32 state.
DTYPES = {
  "float32": (jnp.float32, False),
  "bfloat16": (jnp.bfloat16, False),
  "float64": (jnp.float64, True),
  "float32_x64": (jnp.float32, True),
}


def _problem(dtype):
  """Two same-shaped LoRA pairs (one group of two) and a non-LoRA leaf."""
  keys = iter(jax.random.split(jax.random.key(0), 10))

  def normal(*shape):
    return jax.random.normal(next(keys), shape).astype(dtype)

  params = {name: {"lora_a": normal(8, 2), "lora_b": 0.1 * normal(2, 4)} for name in ("q", "v")}
  params["head"] = normal(4)
  grads = jax.tree.map(lambda p: 0.1 * normal(*p.shape), params)
  return params, grads


def test_every_public_transform_is_covered():
  assert public_transforms() <= set(TRANSFORMS)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_dtypes_and_shapes_do_not_change_on_update(name, dtype):
  dtype, x64 = DTYPES[dtype]
  with jax.enable_x64(x64):
    params, grads = _problem(dtype)
    tx = TRANSFORMS[name]()
    state = tx.init(params)
    # Dtypes and shapes are fixed when the update is traced.
    updates, new_state = jax.eval_shape(tx.update, grads, state, params)
  chex.assert_trees_all_equal_structs(new_state, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


@pytest.mark.parametrize(
  "name", ["adaprelora_momentum", "lora_rite_escape_mass", "lora_pro_full", "scaled_adamw"]
)
def test_scan_over_updates_with_float64_params(name):
  with jax.enable_x64(True):
    params, grads = _problem(jnp.float64)
    tx = TRANSFORMS[name]()

    def step(carry, step_grads):
      params, state = carry
      updates, state = tx.update(step_grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    steps = jax.tree.map(lambda g: jnp.stack([g, 0.5 * g, -g]), grads)
    (final, state), _ = jax.lax.scan(step, (params, tx.init(params)), steps)
  chex.assert_trees_all_equal_shapes_and_dtypes(final, params)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(final))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_wider_gradients_do_not_widen_the_state(name):
  # JAX gradients have their parameters' dtype, but nothing stops a caller
  # from passing wider ones. (No non-LoRA leaf: optax's own Adam widens.)
  with jax.enable_x64(True):
    params, _ = _problem(jnp.float32)
    del params["head"]
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, jnp.float64), params)
    tx = TRANSFORMS[name]()
    state = tx.init(params)
    _, new_state = jax.eval_shape(tx.update, grads, state, params)
  if hasattr(state, "hyperparams") and _OPTAX_VERSION < (0, 2, 8):
    # optax < 0.2.8's inject_hyperparams keeps its float hyperparameters in
    # the widest dtype it sees (b1 becomes float64); the transform's own
    # state must not widen.
    state, new_state = state.inner_state, new_state.inner_state
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


@pytest.mark.parametrize(
  "factory",
  [
    lambda b1: ap.adaprelora(1e-2, b1=b1),
    lambda b1: ap.lora_plus(1e-2, b1=b1),
    lambda b1: ap.scaled_adamw(1e-2, b1=b1),
    lambda b1: ap.lora_pro(1e-2, b1=b1),
    lambda b1: ap.lora_pro(1e-2, mode="full", b1=b1),
    lambda b1: ap.lora_rite(1e-2, b1=b1),
  ],
  ids=["adaprelora", "lora_plus", "scaled_adamw", "lora_pro", "lora_pro_full", "lora_rite"],
)
def test_float64_hyperparameters_do_not_widen_float32_state(factory):
  # NumPy scalars are not weakly typed: under x64, b1 * moment is float64.
  with jax.enable_x64(True):
    params, grads = _problem(jnp.float32)
    tx = factory(np.float64(0.9))
    state = tx.init(params)
    _, new_state = jax.eval_shape(tx.update, grads, state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
