"""Per-step metrics (adaprelora_jax/_src/maths/metrics.py, reports.step_metrics, tracking.py)."""

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import strategies as st

import adaprelora_jax as ap
from adaprelora_jax._src.maths import closed_form
from adaprelora_jax._src.maths import metrics as metrics_lib
from tests import reference


def _pair(rng, d_in, d_out, rank, scale=1.0):
  return {
    "lora_a": jnp.asarray(scale * rng.normal(size=(d_in, rank)), jnp.float32),
    "lora_b": jnp.asarray(scale * rng.normal(size=(rank, d_out)), jnp.float32),
  }


def _grads_of(rng, params):
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)


def _dense(pair):
  return np.asarray(pair["lora_a"], np.float64), np.asarray(pair["lora_b"], np.float64)


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
  d_in=st.integers(1, 9), d_out=st.integers(1, 9), rank=st.integers(1, 4), seed=st.integers(0, 99)
)
def test_weight_change_norm_is_the_dense_frobenius_norm(d_in, d_out, rank, seed):
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(d_in, rank)), rng.normal(size=(rank, d_out))
  da, db = rng.normal(size=(d_in, rank)), rng.normal(size=(rank, d_out))
  expected = np.linalg.norm(da @ b + a @ db)
  got = metrics_lib.weight_change_norm(*(jnp.asarray(x, jnp.float32) for x in (a, b, da, db)))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _scales(state, params):
  """The (p, q) of H from the state's second moments, float64."""
  rows, cols = ap.second_moments(state, params)
  scales = closed_form.factored_scales(rows["q"]["lora_a"], cols["q"]["lora_b"])
  return (np.asarray(x, np.float64) for x in scales)


def _step(tx, params, grads):
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates, state, jax.device_get(ap.step_metrics(state))


def test_adaprelora_metrics_match_the_dense_h_norm_and_the_clipping():
  rng = np.random.default_rng(0)
  params = {"q": _pair(rng, 7, 5, 2)}
  grads = _grads_of(rng, params)
  options = {"damping": 0.0, "metrics": True}
  # learning rate 1: the update is minus the transform's direction.
  free, free_state, free_metrics = _step(
    ap.adaprelora(1.0, clipping_threshold=None, **options), params, grads
  )
  clipped, _, clipped_metrics = _step(
    ap.adaprelora(1.0, clipping_threshold=1e-3, **options), params, grads
  )
  a, b = _dense(params["q"])
  p, q = _scales(free_state, params)
  for updates, got in ((free, free_metrics), (clipped, clipped_metrics)):
    da, db = (-np.asarray(updates["q"][k], np.float64) for k in ("lora_a", "lora_b"))
    delta_w = da @ b + a @ db
    h_norm = np.sqrt(reference.h_norm_sq(delta_w, p, q))
    np.testing.assert_allclose(got["step_h_norm/mean"], h_norm, rtol=1e-3)
    np.testing.assert_allclose(got["factor_norm_a/max"], np.linalg.norm(a), rtol=1e-6)
    np.testing.assert_allclose(got["factor_norm_b/mean"], np.linalg.norm(b), rtol=1e-6)
    assert got["skipped_pairs"] == 0
  assert free_metrics["clip_factor/min"] == 1.0
  ratio = np.linalg.norm(clipped["q"]["lora_a"]) / np.linalg.norm(free["q"]["lora_a"])
  np.testing.assert_allclose(clipped_metrics["clip_factor/min"], ratio, rtol=1e-4)
  assert clipped_metrics["clip_factor/min"] < 0.1
  # No exact statistics: no tangent share.
  assert not any(name.startswith("tangent_share") for name in free_metrics)


def _exact_problem(rng, d_in=6, d_out=5, rank=2):
  """One pair with exact statistics of a rank-one G (one token), so that the
  factored model of G² is exact."""
  pair = _pair(rng, d_in, d_out, rank)
  grad_w = np.outer(rng.normal(size=d_in), rng.normal(size=d_out))
  a, b = _dense(pair)
  params = {"q": {**pair, "grad_sq_rows": jnp.zeros(d_in), "grad_sq_cols": jnp.zeros(d_out)}}
  grads = {
    "q": {
      "lora_a": jnp.asarray(grad_w @ b.T, jnp.float32),
      "lora_b": jnp.asarray(a.T @ grad_w, jnp.float32),
      "grad_sq_rows": jnp.asarray(np.mean(grad_w**2, 1), jnp.float32),
      "grad_sq_cols": jnp.asarray(np.mean(grad_w**2, 0), jnp.float32),
    }
  }
  return params, grads, grad_w


def test_tangent_share_is_the_dense_share_of_the_adafactor_step():
  params, grads, grad_w = _exact_problem(np.random.default_rng(1))
  tx = ap.adaprelora(1.0, damping=0.0, clipping_threshold=None, metrics=True)
  updates, state, got = _step(tx, params, grads)
  a, b = _dense(params["q"])
  p, q = _scales(state, params)
  da, db = (-np.asarray(updates["q"][k], np.float64) for k in ("lora_a", "lora_b"))
  step_norm = np.sqrt(reference.h_norm_sq(da @ b + a @ db, p, q))
  adafactor_norm = np.sqrt(reference.h_norm_sq(grad_w / np.outer(p, q), p, q))  # ‖H⁻¹G‖_H
  np.testing.assert_allclose(got["tangent_share/min"], step_norm / adafactor_norm, rtol=1e-3)
  assert 0.0 < got["tangent_share/mean"] < 1.0


def test_aggregates_run_over_every_pair_and_stacked_layer():
  rng = np.random.default_rng(2)
  stacked = {
    "lora_a": jnp.asarray(rng.normal(size=(3, 6, 2)), jnp.float32),
    "lora_b": jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32),
  }
  params = {"layers": stacked, "other": _pair(rng, 5, 7, 3)}
  grads = _grads_of(rng, params)
  tx = ap.adaprelora(1.0, metrics=True)
  _, _, together = _step(tx, params, grads)
  # Pairs are independent: each one alone gives its own values.
  singles = [_step(tx, {"p": params["other"]}, {"p": grads["other"]})[2]]
  for layer in range(3):
    single = {"p": jax.tree.map(lambda x, i=layer: x[i], stacked)}
    single_grads = {"p": jax.tree.map(lambda x, i=layer: x[i], grads["layers"])}
    singles.append(_step(tx, single, single_grads)[2])
  for name in ("step_h_norm", "factor_norm_b", "factor_norm_a"):
    values = np.array([single[f"{name}/mean"] for single in singles])
    np.testing.assert_allclose(together[f"{name}/mean"], values.mean(), rtol=1e-4)
    np.testing.assert_allclose(together[f"{name}/max"], values.max(), rtol=1e-4)


def test_a_skipped_pair_is_counted_and_left_out_of_the_aggregates():
  rng = np.random.default_rng(3)
  params = {"good": _pair(rng, 6, 4, 2), "bad": _pair(rng, 5, 3, 2)}
  grads = _grads_of(rng, params)
  grads["bad"]["lora_a"] = grads["bad"]["lora_a"].at[0, 0].set(jnp.nan)
  tx = ap.adaprelora(1.0, metrics=True)
  _, _, both = _step(tx, params, grads)
  _, _, alone = _step(tx, {"good": params["good"]}, {"good": grads["good"]})
  assert both["skipped_pairs"] == 1 and alone["skipped_pairs"] == 0
  for name, value in alone.items():
    if name != "skipped_pairs":
      np.testing.assert_allclose(both[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("variant", ["adaprelora", "adaprelora_adamw"])
def test_metrics_change_neither_the_updates_nor_the_default_state(variant):
  rng = np.random.default_rng(4)
  params = {"q": _pair(rng, 6, 4, 2), "head": jnp.ones(3)}
  grads = _grads_of(rng, params)
  factory = getattr(ap, variant)
  plain, plain_state, _ = (*_step_without_metrics(factory(1e-2), params, grads), None)
  tracked, _, _ = _step(factory(1e-2, metrics=True), params, grads)
  chex.assert_trees_all_equal(plain, tracked)
  # Without metrics the state is exactly what it was before metrics existed
  # (tests/_src/engine/test_state_layout.py restores such a checkpoint).
  inner = [s for s in jax.tree.leaves(plain_state, is_leaf=_is_core) if _is_core(s)]
  assert len(inner) == 1 and "metrics" not in inner[0]._fields
  wrapped = factory(1e-2, metrics=True).init(params)
  is_wrapped = lambda node: isinstance(node, ap.WithMetricsState)  # noqa: E731
  (wrapped,) = [s for s in jax.tree.leaves(wrapped, is_leaf=is_wrapped) if is_wrapped(s)]
  chex.assert_trees_all_equal_structs(wrapped.inner_state, inner[0])
  with pytest.raises(ValueError, match="metrics=True"):
    ap.step_metrics(plain_state)


def _is_core(node):
  return isinstance(node, ap.ScaleByAdaPreLoRAState)


def _step_without_metrics(tx, params, grads):
  return jax.jit(tx.update)(grads, tx.init(params), params)


def test_metrics_are_read_through_optax_wrappers_and_keep_the_state_structure():
  rng = np.random.default_rng(5)
  params = {"q": _pair(rng, 6, 4, 2)}
  grads = _grads_of(rng, params)
  _, _, reference = _step(ap.adaprelora(1e-2, metrics=True), params, grads)
  wrapped = {
    "inject_hyperparams": optax.inject_hyperparams(ap.adaprelora)(1e-2, metrics=True),
    "chain": optax.chain(optax.clip_by_global_norm(1e6), ap.adaprelora(1e-2, metrics=True)),
  }
  for name, tx in wrapped.items():
    _, _, got = _step(tx, params, grads)
    chex.assert_trees_all_close(got, reference, rtol=1e-6, custom_message=name)
  # MultiSteps: the metrics of the last completed update (here, of the mean
  # of two equal micro-batch gradients: the same as one step).
  tx = optax.MultiSteps(ap.adaprelora(1e-2, metrics=True), every_k_schedule=2)
  state = tx.init(params)
  for _ in range(2):
    _, state = jax.jit(tx.update)(grads, state, params)
  chex.assert_trees_all_close(jax.device_get(ap.step_metrics(state)), reference, rtol=1e-6)
  # The state's structure is the same before and after an update, so it can
  # be carried through jax.lax.scan.
  tx = ap.adaprelora(1e-2, metrics=True)

  def body(state, _):
    return tx.update(grads, state, params)[1], None

  state, _ = jax.lax.scan(body, tx.init(params), length=2)
  assert set(ap.step_metrics(state)) == set(reference)


def test_metrics_through_nnx_optimizer():
  model = ap.nn.LoRA(6, 2, 4, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ap.adaprelora(1e-2, metrics=True), wrt=nnx.LoRAParam)
  x = jnp.ones((8, 6))

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: jnp.mean((m(x) - 1.0) ** 2)  # noqa: E731
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return ap.step_metrics(optimizer.opt_state)

  first = step(model, optimizer)
  second = jax.device_get(ap.step_metrics(optimizer.opt_state))
  chex.assert_trees_all_close(jax.device_get(first), second)
  # ap.nn.LoRA carries exact statistics; lora_b starts at zero.
  assert "tangent_share/min" in second and second["factor_norm_b/max"] == 0.0


BASELINES = {
  "lora_plus": lambda **kw: ap.lora_plus(1e-2, **kw),
  "scaled_gd": lambda **kw: ap.scaled_gd(1e-2, **kw),
  "scaled_adamw": lambda **kw: ap.scaled_adamw(1e-2, **kw),
  "lora_pro": lambda **kw: ap.lora_pro(1e-2, **kw),
  "lora_rite": lambda **kw: ap.lora_rite(1e-2, **kw),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_reports_the_factor_metrics_of_its_step(name):
  rng = np.random.default_rng(6)
  params = {"q": _pair(rng, 6, 4, 2), "head": jnp.ones(3)}
  grads = _grads_of(rng, params)
  plain = _step_without_metrics(BASELINES[name](), params, grads)[0]
  tracked, _, got = _step(BASELINES[name](metrics=True), params, grads)
  chex.assert_trees_all_equal(plain, tracked)
  # The metrics are recorded before the learning rate 1e-2.
  a, b = _dense(params["q"])
  da, db = (-1e2 * np.asarray(tracked["q"][k], np.float64) for k in ("lora_a", "lora_b"))
  np.testing.assert_allclose(got["update_norm/mean"], np.linalg.norm(da @ b + a @ db), rtol=1e-4)
  np.testing.assert_allclose(got["factor_norm_a/max"], np.linalg.norm(a), rtol=1e-6)


def test_track_step_metrics_beside_adaprelora_measures_its_weight_change():
  rng = np.random.default_rng(9)
  params = {"q": _pair(rng, 7, 5, 2)}
  grads = _grads_of(rng, params)
  tx = optax.chain(
    ap.scale_by_adaprelora(metrics=True, lora_scale=2.0), ap.track_step_metrics(), optax.scale(-1.0)
  )
  updates, _, got = _step(tx, params, grads)
  a, b = _dense(params["q"])
  da, db = (-np.asarray(updates["q"][k], np.float64) for k in ("lora_a", "lora_b"))
  np.testing.assert_allclose(got["1/update_norm/max"], np.linalg.norm(da @ b + a @ db), rtol=1e-4)
  assert "0/step_h_norm/max" in got and "0/update_norm/max" not in got


def test_track_step_metrics_passes_updates_through_and_prefixes_several():
  rng = np.random.default_rng(7)
  params = {"q": _pair(rng, 6, 4, 2), "head": jnp.ones(3)}
  grads = _grads_of(rng, params)
  tx = optax.chain(ap.track_step_metrics(), optax.adam(1e-2), ap.track_step_metrics())
  updates, _, got = _step(tx, params, grads)
  chex.assert_trees_all_equal(updates, _step_without_metrics(optax.adam(1e-2), params, grads)[0])
  a, b = _dense(params["q"])
  ga, gb = (np.asarray(grads["q"][k], np.float64) for k in ("lora_a", "lora_b"))
  np.testing.assert_allclose(got["0/update_norm/max"], np.linalg.norm(ga @ b + a @ gb), rtol=1e-4)
  names = [
    f"{m}/{agg}"
    for m in ("factor_norm_a", "factor_norm_b", "update_norm")
    for agg in ("mean", "max")
  ]
  assert set(got) == {f"{index}/{name}" for index in "01" for name in names}


def test_metrics_with_state_shardings_on_eight_devices():
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  mesh = jax.make_mesh(
    (8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:8]
  )
  rng = np.random.default_rng(8)
  params = {"q": _pair(rng, 16, 24, 2)}
  grads = _grads_of(rng, params)
  specs = {"q": {"lora_a": P("model", None), "lora_b": P(None, "model")}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  tx = ap.adaprelora(1e-2, metrics=True)
  state_shardings = ap.sharding.state_shardings(tx, params, shardings)
  metric_shardings = jax.tree.leaves(optax.tree_utils.tree_get(state_shardings, "metrics"))
  assert metric_shardings and all(s.spec == P() for s in metric_shardings)
  sharded_params = jax.device_put(params, shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(sharded_params)
  _, state = jax.jit(tx.update, out_shardings=(shardings, state_shardings))(
    jax.device_put(grads, shardings), state, sharded_params
  )
  _, _, expected = _step(tx, params, grads)
  chex.assert_trees_all_close(jax.device_get(ap.step_metrics(state)), expected, rtol=1e-5)
