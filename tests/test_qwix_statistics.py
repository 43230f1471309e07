"""adaprelora_jax.qwix.LoraProvider: exact statistics from qwix LoRA ops.

On the Gemma-like model of tests/qwix_models.py (2-D ``nnx.Linear``, N-D
attention einsums, the MoE einsum), the probes' gradients equal the row and
column means of ``G²``, where ``G`` is ``jax.grad`` with respect to a dense
zero ``ΔW`` added to the weight, with and without QLoRA and dropout; the
optimizer reads them with no glue, its step equals the dense H-projection
oracle, it shards with no factor all-gather, and ``optax.MultiSteps`` hands
it the mean of the micro-batch statistics.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaprelora_jax as ap

pytest.importorskip("qwix")
import qwix  # noqa: E402

from adaprelora_jax import qwix as ap_qwix  # noqa: E402  (needs qwix)
from tests import qwix_models as qm  # noqa: E402
from tests.test_qwix import _by_path  # noqa: E402
from tests.test_qwix import _flat_factors  # noqa: E402
from tests.test_qwix import assert_step_is_the_oracle  # noqa: E402
from tests.test_qwix import sharded_pairing_of  # noqa: E402
from tests.test_qwix import sharded_run  # noqa: E402
from tests.test_qwix import train  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix.*")

PROBES = nnx.Any(nnx.LoRAParam, qm.DenseDelta)


def _flatten(grad, in_axes, out_axes):
  d_in = int(np.prod([grad.shape[axis] for axis in in_axes]))
  return np.transpose(grad, (*in_axes, *out_axes)).reshape(d_in, -1)


def _probe_and_dense_gradients(model, x, y):
  """``{pair: (rows, cols, G)}``: the probes' gradients (flattened) and the
  dense ``G`` of each weight, from one backward pass."""
  grads = _by_path(nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, PROBES))(model, x, y))
  found = {}
  for name, (in_axes, out_axes) in qm.WEIGHT_AXES.items():
    module = name.split("/")[0]
    found[name] = (
      grads[f"{name}_grad_sq_rows"].reshape(-1),
      grads[f"{name}_grad_sq_cols"].reshape(-1),
      _flatten(grads[f"{module}/dw"], in_axes, out_axes),
    )
  return found


OPTIONS = {
  "plain": {},
  "nf4": {"weight_qtype": "nf4"},
  "dropout": {"dropout": 0.5},
}


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_probes_are_the_statistics_of_the_dense_weight_gradient(options):
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(exact_statistics=True, dense_delta=True, **OPTIONS[options])
    plain = qm.lora_model(exact_statistics=True, dense_delta=True)
  x, y = qm.batch()
  # QLoRA and dropout really change what the model computes.
  assert (options == "plain") == np.allclose(model(x), plain(x), rtol=1e-6), options
  for name, (rows, cols, grad_w) in _probe_and_dense_gradients(model, x, y).items():
    # The statistics of s·G, the gradient of the product a·b (s = alpha/rank).
    scaled = qm.SCALE * grad_w
    assert np.abs(grad_w).max() > 1e-3, name  # a real gradient, not zeros
    np.testing.assert_allclose(rows, np.mean(scaled**2, 1), rtol=2e-5, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(cols, np.mean(scaled**2, 0), rtol=2e-5, atol=1e-9, err_msg=name)


def test_same_factors_outputs_and_gradients_as_qwix():
  """The provider changes nothing qwix computes: same LoRA factors, same
  outputs, same factor gradients; it only adds the probes."""
  with jax.set_mesh(qm.mesh(1)):
    ours = qm.lora_model(exact_statistics=True)
    theirs = qm.lora_model()
  x, y = qm.batch()
  np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))

  def lora_grads(model):
    grads = nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)
    return {path: g for path, g in _by_path(grads).items() if "_lora_" in path}

  ours_grads, theirs_grads = lora_grads(ours), lora_grads(theirs)
  assert sorted(ours_grads) == sorted(theirs_grads)
  chex.assert_trees_all_close(ours_grads, theirs_grads, rtol=1e-6, atol=1e-7)
  probes = [path for path in _by_path(nnx.state(ours, nnx.LoRAParam)) if "grad_sq" in path]
  assert len(probes) == 2 * len(qm.WEIGHT_AXES)


def test_every_pair_has_exact_statistics_with_no_glue():
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(exact_statistics=True)
  plan = ap.plan_pairs(nnx.state(model, nnx.LoRAParam), strict=True, statistics="exact")
  assert sorted(pair.name for pair in plan.pairs) == sorted(qm.WEIGHT_AXES)
  assert all(pair.has_statistics for pair in plan.pairs)


@pytest.mark.parametrize("lora_scale", [None, qm.SCALE], ids=["unscaled", "lora_scale"])
def test_step_with_exact_statistics_matches_the_dense_oracle(lora_scale):
  """One step on every pair equals the dense H-projection of the Adafactor
  step built from the exact statistics of G (docs/design.md §3, §9)."""
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(exact_statistics=True, dense_delta=True)
  x, y = qm.batch()
  dense = _probe_and_dense_gradients(model, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  grads = nnx.as_pure(nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y))
  tx = ap.scale_by_adaprelora(
    damping=0.0, clipping_threshold=None, lora_scale=lora_scale, statistics="exact"
  )
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  rows, cols = ap.second_moments(state, params)
  rows, cols, updates = _by_path(rows), _by_path(cols), _by_path(updates)
  s = 1.0 if lora_scale is None else lora_scale
  for name, (a, b) in _flat_factors(model).items():
    # What the optimizer works with: G' = (SCALE / s)·G (docs/design.md §9).
    grad_w = (qm.SCALE / s) * dense[name][2]
    want_rows, want_cols = np.mean(grad_w**2, 1), np.mean(grad_w**2, 0)
    got_rows, got_cols = rows[f"{name}_lora_a"], cols[f"{name}_lora_b"]
    np.testing.assert_allclose(got_rows, want_rows, rtol=1e-4, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(got_cols, want_cols, rtol=1e-4, atol=1e-12, err_msg=name)
    assert_step_is_the_oracle(updates, name, a, b, grad_w, want_rows, want_cols, s)


def test_exact_and_tangent_statistics_give_different_steps():
  """The control for the oracle test: the probes are what the step uses."""
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(exact_statistics=True)
  x, y = qm.batch()
  params = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  grads = nnx.as_pure(nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y))

  def step(statistics, grads):
    tx = ap.scale_by_adaprelora(statistics=statistics)
    return tx.update(grads, tx.init(params), params)[0]

  exact = _by_path(step("auto", grads))
  tangent = _by_path(step("tangent", grads))
  name = "q_einsum/w_lora_a"
  assert not np.allclose(exact[name], tangent[name], rtol=1e-2)


def test_trains_from_qwix_init():
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(exact_statistics=True, random_b=False)
    losses, _ = train(model, ap.adaprelora(1e-2, lora_scale=qm.SCALE), 12)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], losses


def test_sharded_training_equals_unsharded():
  """(fsdp 2, tp 4) mesh: the probes take the factors' shardings, and the run
  equals the one-device run."""
  expected_losses, expected_params, expected_state, _ = sharded_run(1, True, exact_statistics=True)
  losses, params, state, model = sharded_run(8, True, exact_statistics=True)
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  chex.assert_trees_all_close(params, expected_params, rtol=2e-4, atol=2e-6)
  chex.assert_trees_all_close(state, expected_state, rtol=2e-4, atol=2e-6)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
  assert specs["kv_einsum"]["w_grad_sq_cols"].get_value() == jax.P(None, None, "tp", None)
  assert specs["kv_einsum"]["w_lora_b"].get_value() == jax.P(None, None, "tp", None)


def test_sharded_update_never_gathers_a_factor():
  with jax.set_mesh(qm.mesh(8)):
    model = qm.lora_model(exact_statistics=True)
    tx = ap.adaprelora(1e-2, lora_scale=qm.SCALE, pairing=sharded_pairing_of(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    x, y = qm.batch()
    grads = nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)
    update = nnx.jit(lambda model, optimizer, grads: optimizer.update(model, grads))
    hlo = update.lower(model, optimizer, grads).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute"):
    assert f" {collective}(" not in hlo and f" {collective}-start(" not in hlo, collective


def test_multisteps_averages_the_micro_batch_statistics():
  """Under ``optax.MultiSteps`` the optimizer sees the mean of the probes'
  micro-batch statistics (not the statistics of the accumulated G): after
  the first real step (β2 = 0) the second moments are that mean (+ eps)."""
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(exact_statistics=True, dense_delta=True)
  micro_batches = [qm.batch(seed) for seed in (0, 1)]
  per_batch = [_probe_and_dense_gradients(model, x, y) for x, y in micro_batches]
  eps = 1e-30
  tx = optax.MultiSteps(ap.scale_by_adaprelora(eps=eps), every_k_schedule=2)
  params = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  state = tx.init(params)
  for x, y in micro_batches:
    grads = nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)
    _, state = tx.update(nnx.as_pure(grads), state, params)
  rows, cols = ap.second_moments(state.inner_opt_state, params)
  rows, cols = _by_path(rows), _by_path(cols)
  for name in qm.WEIGHT_AXES:
    mean_rows = np.mean([found[name][0] for found in per_batch], axis=0)
    mean_cols = np.mean([found[name][1] for found in per_batch], axis=0)
    np.testing.assert_allclose(rows[f"{name}_lora_a"], mean_rows + eps, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(cols[f"{name}_lora_b"], mean_cols + eps, rtol=1e-5, err_msg=name)
    # ... which is not the statistic of the accumulated gradient.
    accumulated = qm.SCALE * np.mean([found[name][2] for found in per_batch], axis=0)
    assert not np.allclose(mean_rows, np.mean(accumulated**2, 1), rtol=1e-2), name


def test_batched_dot_general_pairs_keep_their_layer_axis():
  """A batched dot_general (layers stacked on axis 0): the pair's batch axis
  is the layer axis, and the probes are per layer."""

  class Stacked(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (3, qm.D, 5)))
      self.dw = qm.DenseDelta(jnp.zeros((3, qm.D, 5)))

    def __call__(self, x):
      dims = (((2,), (1,)), ((0,), (0,)))
      y = jax.lax.dot_general(x, self.w[...], dims)
      return y + qm.interception.disable_interceptions(jax.lax.dot_general)(x, self.dw[...], dims)

  provider = ap_qwix.LoraProvider(module_path=".*", rank=2, alpha=4.0)
  model = qwix.apply_lora_to_model(
    Stacked(nnx.Rngs(0)), provider, jnp.ones((3, 4, qm.D)), rngs=nnx.Rngs(1)
  )
  model.w_lora_b.set_value(0.3 * jax.random.normal(jax.random.key(2), model.w_lora_b.shape))
  assert model.w_grad_sq_rows.shape == (3, qm.D, 1)
  assert model.w_grad_sq_cols.shape == (3, 1, 5)
  x = jax.random.normal(jax.random.key(3), (3, 7, qm.D))
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, PROBES))(model)
  grad_w = 2.0 * np.asarray(grads["dw"][...], np.float64)  # s = alpha / rank = 2
  np.testing.assert_allclose(
    np.asarray(grads["w_grad_sq_rows"][...])[..., 0], np.mean(grad_w**2, -1), rtol=2e-5
  )
  np.testing.assert_allclose(
    np.asarray(grads["w_grad_sq_cols"][...])[:, 0], np.mean(grad_w**2, -2), rtol=2e-5
  )
  plan = ap.plan_pairs(nnx.state(model, nnx.LoRAParam), statistics="exact")
  (pair,) = plan.pairs
  assert (pair.lead_shape, pair.d_in, pair.d_out) == ((3,), qm.D, 5)


@pytest.mark.parametrize("devices", [1, 8])
def test_per_shard_statistics_on_a_sharded_batch(devices):
  """``statistics_batch_axes=("fsdp",)``: with the batch split over the
  mesh's fsdp axis (2 shards on 8 devices, 1 on one), the probes are the
  mean over shards of the statistics of each shard's own mean-loss gradient
  (dense ΔW gradients of each half-batch); with one shard, the global ones."""
  shards = 2 if devices == 8 else 1
  mesh = qm.mesh(devices)
  with jax.set_mesh(mesh):
    model = qm.lora_model(exact_statistics=True, dense_delta=True, statistics_batch_axes=("fsdp",))
    x, y = qm.batch()
    batch_sharding = jax.NamedSharding(mesh, jax.P("fsdp"))
    found = _probe_and_dense_gradients(
      model, jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
    )
    halves = [
      _probe_and_dense_gradients(model, x[k * 2 : (k + 1) * 2], y[k * 2 : (k + 1) * 2])
      for k in range(2)
    ]
  for name, (rows, cols, grad_w) in found.items():
    per_half = [qm.SCALE * half[name][2] for half in halves]
    if shards == 1:
      scaled = qm.SCALE * grad_w
      want_rows, want_cols = np.mean(scaled**2, 1), np.mean(scaled**2, 0)
    else:
      want_rows = np.mean([np.mean(g**2, 1) for g in per_half], axis=0)
      want_cols = np.mean([np.mean(g**2, 0) for g in per_half], axis=0)
    np.testing.assert_allclose(rows, want_rows, rtol=2e-5, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(cols, want_cols, rtol=2e-5, atol=1e-9, err_msg=name)


def test_per_shard_statistics_name_a_missing_mesh_axis():
  with jax.set_mesh(qm.mesh(1)):
    with pytest.raises(ValueError, match=r"no axis \['data'\]"):
      qm.lora_model(exact_statistics=True, statistics_batch_axes=("data",))


def test_linen_scanned_layers_with_the_layer_axis_in_the_middle():
  """MaxText's layout: linen layers under ``nn.scan`` with the parameters'
  layer axis at 1 (``a (d, L, r)``, ``b (r, L, d)``). The probes are stacked
  like the factors (``(d, L, 1)``, ``(1, L, d)``), carry each layer's exact
  statistics, and the declared dimension numbers read them."""
  from flax import linen  # noqa: PLC0415

  d, layers, rank, alpha = 6, 3, 2, 4.0

  class Block(linen.Module):
    @linen.compact
    def __call__(self, x, _):
      dense = linen.Dense(d, use_bias=False, kernel_init=linen.initializers.normal(0.5))
      return jnp.tanh(dense(x)), None

  class Model(linen.Module):
    @linen.compact
    def __call__(self, x):
      scan = linen.scan(
        Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=layers
      )
      return scan()(x, None)[0]

  provider = ap_qwix.LoraProvider(module_path=".*", rank=rank, alpha=alpha)
  model = qwix.apply_lora_to_model(Model(), provider)
  x = jax.random.normal(jax.random.key(0), (5, d))
  params = model.init(jax.random.key(1), x)["params"]
  dense = params["ScanBlock_0"]["Dense_0"]
  assert dense["kernel_lora_a"].shape == (d, layers, rank)
  assert dense["kernel_grad_sq_rows"].shape == (d, layers, 1)
  assert dense["kernel_grad_sq_cols"].shape == (1, layers, d)
  dense["kernel_lora_b"] = 0.5 * jax.random.normal(jax.random.key(2), dense["kernel_lora_b"].shape)

  def loss(params):
    return jnp.sum(jnp.sin(model.apply({"params": params}, x)))

  grads = jax.grad(loss)(params)["ScanBlock_0"]["Dense_0"]
  scaled = (alpha / rank) * np.asarray(grads["kernel"], np.float64)  # (d, L, d)
  rows, cols = np.asarray(grads["kernel_grad_sq_rows"]), np.asarray(grads["kernel_grad_sq_cols"])
  np.testing.assert_allclose(rows[:, :, 0], np.mean(scaled**2, axis=2), rtol=2e-5)
  np.testing.assert_allclose(cols[0], np.mean(scaled**2, axis=0), rtol=2e-5)
  pairing = ap.annotate_pairing(
    dimension_numbers=ap.LoRADimensionNumbers(a_batch_axes=(1,), b_batch_axes=(1,))
  )
  # The linen params hold the frozen kernel too: the alias routes it.
  tx = ap.adaprelora(1.0, pairing=pairing, statistics="exact", eps=0.0)
  _, state = tx.update(jax.grad(loss)(params), tx.init(params), params)
  got_rows, got_cols = ap.second_moments(state, params, pairing=pairing)
  got_rows = np.asarray(got_rows["ScanBlock_0"]["Dense_0"]["kernel_lora_a"])
  got_cols = np.asarray(got_cols["ScanBlock_0"]["Dense_0"]["kernel_lora_b"])
  # One row vector per layer, (L, d), in each pair's canonical layout.
  np.testing.assert_allclose(got_rows, np.mean(scaled**2, axis=2).T, rtol=2e-5)
  np.testing.assert_allclose(got_cols, np.mean(scaled**2, axis=0), rtol=2e-5)


def test_bfloat16_models_get_float32_statistics():
  """A bf16 layer: the probes, and the statistics in them, are float32 and
  match the float32 layer's to bf16 rounding."""

  def build(dtype):
    layer = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    provider = ap_qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0)
    layer = qwix.apply_lora_to_model(layer, provider, jnp.ones((1, 16)), rngs=nnx.Rngs(1))
    layer.kernel_lora_b.set_value(0.3 * jax.random.normal(jax.random.key(2), (2, 8)))
    # The same values in the model's dtype (the probes stay as created).
    for variable in (layer.kernel, layer.bias, layer.kernel_lora_a, layer.kernel_lora_b):
      variable.set_value(variable.get_value().astype(dtype))
    layer.dtype = dtype
    return layer

  x = jax.random.normal(jax.random.key(3), (32, 16))
  stats = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    layer = build(dtype)
    assert layer.kernel_grad_sq_rows.get_value().dtype == jnp.float32
    grads = nnx.grad(
      lambda m, dtype=dtype: jnp.mean(m(x.astype(dtype)).astype(jnp.float32) ** 2),
      argnums=nnx.DiffState(0, nnx.LoRAParam),
    )(layer)
    stats[dtype] = np.asarray(grads["kernel_grad_sq_rows"][...])
    assert stats[dtype].dtype == np.float32
  np.testing.assert_allclose(stats[jnp.bfloat16], stats[jnp.float32], rtol=5e-2)


def test_global_norm_clipping_can_skip_the_probes():
  """The probes are gradient leaves, so a transform chained before the
  optimizer sees them (as Tunix's logged grad_norm does). docs/usage.md's
  recipe masks them out of global-norm clipping: the factor gradients are
  clipped by their own norm and the statistics pass through untouched."""
  with jax.set_mesh(qm.mesh(1)):
    model = qm.lora_model(exact_statistics=True)
  x, y = qm.batch()
  grads = nnx.as_pure(nnx.grad(qm.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y))

  def not_statistics(tree):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: "grad_sq_" not in jax.tree_util.keystr(path), tree
    )

  clip = optax.masked(optax.clip_by_global_norm(1e-3), not_statistics)
  clipped, _ = clip.update(grads, clip.init(grads))
  flat, clipped_flat = _by_path(grads), _by_path(clipped)
  factors = [path for path in flat if "_lora_" in path]
  probes = [path for path in flat if "grad_sq_" in path]
  norm = np.sqrt(sum(np.sum(flat[path] ** 2) for path in factors))
  assert norm > 1e-3
  for path in factors:
    np.testing.assert_allclose(clipped_flat[path], flat[path] * 1e-3 / norm, rtol=1e-5)
  for path in probes:
    np.testing.assert_array_equal(clipped_flat[path], flat[path])
