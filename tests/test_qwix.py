"""qwix LoRA (``qwix.apply_lora_to_model``) on a Gemma-like nnx model.

Every factor layout qwix gives (2-D for ``nnx.Linear``, N-D for einsums)
is found by the default pairing, updated by the dense oracle of
docs/design.md §3 on its flattened matrix (docs/design.md §9), trains under
``nnx.Optimizer`` with every optimizer of the package, and shards on 8
emulated devices (tests/conftest.py) with the shardings qwix gives the
factors.
"""

import re

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import adaprelora_jax as ap
from adaprelora_jax import sharding
from tests import reference

pytest.importorskip("qwix")
from tests import qwix_models as qm  # noqa: E402  (needs qwix)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix.*")

BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def _names(path):
  return ap.pairing.path_names(path)


def _by_path(state):
  """``{path: array}`` for an ``nnx.State`` (or a pure tree)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.as_pure(state))
  return {ap.pairing.format_path(_names(path)): np.asarray(leaf, np.float64) for path, leaf in flat}


def test_every_qwix_factor_is_paired():
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model()
  plan = ap.plan_pairs(nnx.state(model, nnx.Param))
  pairs = {pair.name: pair for pair in plan.pairs}
  assert sorted(pairs) == sorted(qm.WEIGHT_AXES)
  # Nothing LoRA falls to the fallback: only base weights and biases do.
  others = [plan.paths[i] for i in plan.other_indices]
  assert not [path for path in others if "lora" in path], others
  shapes = {name: (pair.d_in, pair.rank, pair.d_out) for name, pair in pairs.items()}
  assert shapes == {
    "q_einsum/w": (qm.D, qm.RANK, qm.N * qm.H),
    "kv_einsum/w": (qm.D, qm.RANK, qm.C * qm.N * qm.H),
    "attn_vec_einsum/w": (qm.N * qm.H, qm.RANK, qm.D),
    "moe/w": (qm.E * qm.D, qm.RANK, qm.F),
    "up/kernel": (qm.D, qm.RANK, qm.F),
    "down/kernel": (qm.F, qm.RANK, qm.D),
  }
  # With the LoRA params alone (as nnx.Optimizer(wrt=nnx.LoRAParam) sees
  # them) every leaf is a factor.
  assert ap.plan_pairs(nnx.state(model, nnx.LoRAParam), strict=True).num_rows == 6


def _flat_factors(model):
  """Each pair's flattened ``(a (d_in, r), b (r, d_out))`` in numpy, built
  from qwix's layout rule (a: the weight's axes shared with the input, then
  the rank; b: the rank, then the others), independently of the package."""
  lora = _by_path(nnx.state(model, nnx.LoRAParam))
  return {
    name: (lora[f"{name}_lora_a"].reshape(-1, qm.RANK), lora[f"{name}_lora_b"].reshape(qm.RANK, -1))
    for name in qm.WEIGHT_AXES
  }


def _flat_weight_gradients(model, x, y):
  """``G = ∂L/∂W`` of every adapted weight as its (d_in, d_out) matrix."""
  grads = _by_path(nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, BASE))(model, x, y))
  flat = {}
  for name, (in_axes, out_axes) in qm.WEIGHT_AXES.items():
    grad = grads[name]
    d_in = int(np.prod([grad.shape[axis] for axis in in_axes]))
    flat[name] = np.transpose(grad, (*in_axes, *out_axes)).reshape(d_in, -1)
  return flat


def _tangent_statistics(a, b, grad_w):
  """Row and column means of the squared tangent projection of ``G``
  (docs/design.md §5), from dense projection matrices."""
  proj_a = a @ np.linalg.solve(a.T @ a, a.T)
  proj_b = b.T @ np.linalg.solve(b @ b.T, b)
  tangent = proj_a @ grad_w + grad_w @ proj_b - proj_a @ grad_w @ proj_b
  return np.mean(tangent**2, axis=1), np.mean(tangent**2, axis=0)


@pytest.mark.parametrize("lora_scale", [None, qm.SCALE], ids=["unscaled", "lora_scale"])
def test_nd_pairs_match_the_dense_oracle(lora_scale):
  """One step on every pair, N-D ones included, equals the dense
  H-projection of the Adafactor step on the pair's flattened matrix."""
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model()
  x, y = qm.batch()
  params = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  grads = nnx.as_pure(nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y))
  tx = ap.scale_by_adaprelora(damping=0.0, clipping_threshold=None, lora_scale=lora_scale)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  rows, cols = ap.second_moments(state, params)
  rows, cols, updates = _by_path(rows), _by_path(cols), _by_path(updates)
  factors = _flat_factors(model)
  weight_grads = _flat_weight_gradients(model, x, y)
  lora_grads = _by_path(grads)
  # ``s`` is what the statistics and step are computed for: qwix's
  # alpha / rank when declared, else 1 (docs/design.md §9).
  s = 1.0 if lora_scale is None else lora_scale
  for name, (a, b) in factors.items():
    grad_w = weight_grads[name]
    # qwix's map is x·(SCALE·a·b): the factor gradients are SCALE·J*(G),
    # flattened exactly as the package flattens the factors.
    np.testing.assert_allclose(
      lora_grads[f"{name}_lora_a"].reshape(a.shape), qm.SCALE * grad_w @ b.T, rtol=1e-4, atol=1e-6
    )
    # The statistics: of the tangent projection of G' = (SCALE / s)·G, the
    # gradient of the unit map scaled back by s.
    want_rows, want_cols = _tangent_statistics(a, b, (qm.SCALE / s) * grad_w)
    got_rows, got_cols = rows[f"{name}_lora_a"], cols[f"{name}_lora_b"]
    np.testing.assert_allclose(got_rows, want_rows, rtol=2e-3, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(got_cols, want_cols, rtol=2e-3, atol=1e-9, err_msg=name)
    assert_step_is_the_oracle(updates, name, a, b, (qm.SCALE / s) * grad_w, got_rows, got_cols, s)


def assert_step_is_the_oracle(updates, name, a, b, grad_w, rows, cols, s):
  """The pair's weight step is the dense H-projection of the Adafactor step
  for the gradient ``grad_w`` the optimizer works with and statistics
  ``rows``, ``cols`` (p = sqrt(R / mean R), q = sqrt(C), docs/design.md §2);
  ``s`` is the scale the optimizer was told (docs/design.md §9)."""
  row_scale, col_scale = np.sqrt(rows / rows.mean()), np.sqrt(cols)
  delta_a = updates[f"{name}_lora_a"].reshape(a.shape)
  delta_b = updates[f"{name}_lora_b"].reshape(b.shape)
  weight_step = qm.SCALE * (delta_a @ b + a @ delta_b)
  # With lora_scale the weight-space step is the projected Adafactor step;
  # without, it is SCALE times that.
  expected = (qm.SCALE / s) * reference.h_projection(a, b, grad_w, row_scale, col_scale)
  np.testing.assert_allclose(
    weight_step, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max(), err_msg=name
  )


def train(model, tx, steps, *, wrt=nnx.LoRAParam):
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(qm.loss_fn, argnums=nnx.DiffState(0, wrt))(model, x, y)
    optimizer.update(model, grads)
    return loss

  x, y = qm.batch()
  return [float(step(model, optimizer, x, y)) for _ in range(steps)], optimizer


OPTIMIZERS = {
  "adaprelora": lambda: ap.adaprelora(1e-2),
  "adaprelora_lora_scale": lambda: ap.adaprelora(1e-2, lora_scale=qm.SCALE, b1=0.9),
  "lora_plus": lambda: ap.lora_plus(1e-2, lr_ratio=4.0),
  "scaled_gd": lambda: ap.scaled_gd(3e-2),
  "scaled_adamw": lambda: ap.scaled_adamw(1e-2),
  "lora_pro": lambda: ap.lora_pro(1e-2),
  "lora_rite": lambda: ap.lora_rite(1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_qwix_model_trains_with_every_optimizer(name):
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(random_b=False)  # b = 0, as qwix initializes it
    base = _by_path(nnx.state(model, BASE))
    losses, _ = train(model, OPTIMIZERS[name](), 12)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], losses
  # Only the LoRA factors moved.
  for path, value in _by_path(nnx.state(model, BASE)).items():
    np.testing.assert_array_equal(value, base[path], err_msg=path)


def sharded_run(devices, use_sharded_pairing, steps=2, **model_options):
  """Two steps of adaprelora on the qwix model on ``devices`` devices:
  ``(losses, LoRA params, optimizer state, model)``."""
  with jax.set_mesh(qm.mesh(devices)):
    model = qm.lora_model(**model_options)
    pairing = sharded_pairing_of(model) if use_sharded_pairing else "nnx"
    tx = ap.adaprelora(1e-2, b1=0.9, lora_scale=qm.SCALE, pairing=pairing)
    losses, optimizer = train(model, tx, steps)
  return (
    losses,
    nnx.as_pure(nnx.state(model, nnx.LoRAParam)),
    nnx.as_pure(nnx.state(optimizer, nnx.OptState)),
    model,
  )


def sharded_pairing_of(model):
  return sharding.sharded_pairing(nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam)))


@pytest.mark.parametrize("use_sharded_pairing", [False, True], ids=["nnx", "sharded_pairing"])
def test_sharded_training_equals_unsharded(use_sharded_pairing):
  """qwix's inherited shardings on a (fsdp 2, tp 4) mesh: the same steps as
  on one device, and factors and state keep the layout their metadata asks
  for. (The unsharded run uses the same pairing: sharded_pairing reorders
  the flattening of N-D factors, hence the order of their d_out vectors.)"""
  expected_losses, expected_params, expected_state, _ = sharded_run(1, use_sharded_pairing)
  losses, params, state, model = sharded_run(8, use_sharded_pairing)
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  chex.assert_trees_all_close(params, expected_params, rtol=2e-4, atol=2e-6)
  chex.assert_trees_all_close(state, expected_state, rtol=2e-4, atol=2e-6)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
  # The factor of ``(r, C, N, H)`` keeps its head-sharded layout.
  assert specs["kv_einsum"]["w_lora_b"].get_value() == jax.P(None, None, "tp", None)
  head_sharded = jax.sharding.NamedSharding(qm.mesh(8), jax.P(None, None, "tp", None))
  assert params["kv_einsum"]["w_lora_b"].sharding.is_equivalent_to(head_sharded, 4)


_COLLECTIVE = re.compile(
  r"=\s*(\(?[^=]*?\)?)\s*(all-gather|all-to-all|collective-permute)(?:-start)?\("
)


def _optimizer_collectives(pairing_of_model):
  """Collectives in the compiled ``optimizer.update`` of the sharded model."""
  with jax.set_mesh(qm.mesh(8)):
    model = qm.lora_model()
    tx = ap.adaprelora(1e-2, lora_scale=qm.SCALE, pairing=pairing_of_model(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    x, y = qm.batch()
    grads = nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)
    update = nnx.jit(lambda model, optimizer, grads: optimizer.update(model, grads))
    hlo = update.lower(model, optimizer, grads).compile().as_text()
  found = {}
  for shape, kind in _COLLECTIVE.findall(hlo):
    found.setdefault(kind, []).append(shape)
  return found, hlo


def test_sharded_update_never_gathers_a_factor():
  """No factor is all-gathered; with :func:`sharded_pairing` (which flattens
  a sharded axis first, docs/design.md §9) no factor is resharded at all,
  while the default pairing reshards the two factors whose sharded axis is
  not the major one of their flattened d_in/d_out (kv's ``(r, C, N, H)``,
  the MoE ``(E, D, r)``)."""
  found, hlo = _optimizer_collectives(lambda model: "nnx")
  assert "all-gather" not in found, found
  assert "all-reduce" in hlo  # the r×r Gram matrices are reduced across shards
  assert found.get("all-to-all") or found.get("collective-permute")
  found, hlo = _optimizer_collectives(sharded_pairing_of)
  assert not found, found
  assert "all-reduce" in hlo


def test_update_takes_nnx_states_of_sharded_variables():
  """``tx.update`` on ``nnx.State``s of Variables (not pure arrays), as a
  hand-written train step passes them: the state's per-pair Variables carry
  other sharding metadata than the factors', which must not matter."""
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model()
    x, y = qm.batch()
    params = nnx.state(model, nnx.LoRAParam)
    grads = nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)
    tx = ap.adaprelora(1e-2)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    pure = nnx.as_pure(params)
    expected, _ = jax.jit(tx.update)(nnx.as_pure(grads), tx.init(pure), pure)
  chex.assert_trees_all_close(nnx.as_pure(updates), expected, rtol=1e-6, atol=1e-9)
