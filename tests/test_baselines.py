"""The baseline LoRA optimizers: update rules vs float64 transcriptions of the
papers (tests/baselines_reference.py), invariance, numerics and optax use."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaprelora_jax as ap
from tests import baselines_reference as ref
from tests.test_transform import _quadratic_problem
from tests.test_transform import chex_close

# Every baseline alias with hyperparameters that train _quadratic_problem.
BASELINES = {
  "lora_plus": (ap.lora_plus, dict(learning_rate=0.05, lr_ratio=4.0)),
  "scaled_gd": (ap.scaled_gd, dict(learning_rate=0.3, reg=1e-3)),
  "scaled_adamw": (ap.scaled_adamw, dict(learning_rate=0.05, reg=1e-3)),
  "lora_pro": (ap.lora_pro, dict(learning_rate=0.05)),
  "lora_pro_full": (ap.lora_pro, dict(learning_rate=0.05, mode="full")),
  "lora_rite": (ap.lora_rite, dict(learning_rate=0.05)),
}


def _make(name, **overrides):
  factory, kwargs = BASELINES[name]
  return factory(**{**kwargs, **overrides})


each_baseline = pytest.mark.parametrize("name", list(BASELINES))


# ------------------------------------------------------------- helpers ----


def _torch_problem(seed, m, n, rank, steps, *, b_scale=1.0, grad_scale=1.0):
  """A (r, n), B (m, r) and W-gradients G_t (m, n) in the papers' layout."""
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(rank, n))
  B = rng.normal(size=(m, rank)) * b_scale
  grads = [rng.normal(size=(m, n)) * grad_scale for _ in range(steps)]
  return A, B, grads


def _factor_grads(params, weight_grads, scale=1.0):
  """Flax factor gradients ``(s G bᵀ, s aᵀ G)`` from flax-layout ``G``."""
  return {
    name: {
      "lora_a": scale * g @ params[name]["lora_b"].T,
      "lora_b": scale * params[name]["lora_a"].T @ g,
    }
    for name, g in weight_grads.items()
  }


def _run(tx, params, weight_grad_steps, scale=1.0):
  """Applies ``tx`` for each dict of flax W-gradients; returns the params."""
  state = tx.init(params)
  trajectory = []
  for weight_grads in weight_grad_steps:
    grads = _factor_grads(params, weight_grads, scale)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return trajectory, state


def _run_torch_pair(tx, A, B, grads, scale=1.0):
  """Runs ``tx`` on one pair given in torch layout; returns [(A_t, B_t)]."""
  params = {"w": {"lora_a": jnp.asarray(A.T), "lora_b": jnp.asarray(B.T)}}
  trajectory, _ = _run(tx, params, [{"w": jnp.asarray(g.T)} for g in grads], scale)
  return [(np.asarray(p["w"]["lora_a"]).T, np.asarray(p["w"]["lora_b"]).T) for p in trajectory]


def _assert_trajectories_close(got, expected, rtol):
  assert len(got) == len(expected), (len(got), len(expected))
  for step, ((a, b), (ea, eb)) in enumerate(zip(got, expected, strict=True)):
    for x, y in ((a, ea), (b, eb)):
      error = np.linalg.norm(x - y) / np.linalg.norm(y)
      assert error < rtol, f"step {step}: relative error {error:.2e}"


# ------------------------------------------------ update rules vs papers ----


def test_lora_plus_matches_the_reference():
  A, B, grads = _torch_problem(0, 6, 7, 3, steps=4)
  with jax.enable_x64(True):
    got = _run_torch_pair(ap.lora_plus(0.01, 4.0, weight_decay=0.1), A, B, grads)
  adam_a, adam_b, expected = ref.Adam(), ref.Adam(), []
  for g in grads:
    A, B = ref.lora_plus_step(A, B, g, adam_a, adam_b, lr=0.01, ratio=4.0, weight_decay=0.1)
    expected.append((A, B))
  _assert_trajectories_close(got, expected, 1e-10)


def test_lora_plus_with_ratio_one_is_optax_adamw():
  params, loss = _quadratic_problem()
  params["head"] = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}

  def full_loss(p):
    return loss(p) + jnp.sum(p["head"]["kernel"] ** 2) + jnp.sum(p["head"]["bias"])

  ours, theirs = ap.lora_plus(0.01, 1.0, weight_decay=0.05), optax.adamw(0.01, weight_decay=0.05)
  ours_state, theirs_state = ours.init(params), theirs.init(params)
  for _ in range(3):
    grads = jax.grad(full_loss)(params)
    ours_updates, ours_state = ours.update(grads, ours_state, params)
    theirs_updates, theirs_state = theirs.update(grads, theirs_state, params)
    chex_close(ours_updates, theirs_updates, rtol=1e-6)
    params = optax.apply_updates(params, ours_updates)


def test_lora_plus_scales_only_lora_b():
  params, loss = _quadratic_problem()
  params["layer"]["lora_b"] = jnp.ones_like(params["layer"]["lora_b"]) * 0.1
  params["bias"] = jnp.ones(4)
  grads = jax.grad(lambda p: loss(p) + jnp.sum(p["bias"] ** 2))(params)
  base = ap.lora_plus(0.01, 1.0)
  plus = ap.lora_plus(0.01, 8.0)
  base_updates, _ = base.update(grads, base.init(params), params)
  plus_updates, _ = plus.update(grads, plus.init(params), params)
  chex_close(plus_updates["layer"]["lora_b"], 8.0 * base_updates["layer"]["lora_b"], rtol=1e-6)
  chex_close(plus_updates["layer"]["lora_a"], base_updates["layer"]["lora_a"], rtol=1e-6)
  chex_close(plus_updates["bias"], base_updates["bias"], rtol=1e-6)


def test_scaled_gd_matches_the_reference():
  A, B, grads = _torch_problem(1, 5, 8, 2, steps=4)
  with jax.enable_x64(True):
    got = _run_torch_pair(ap.scaled_gd(0.05, reg=1e-2), A, B, grads)
  expected = []
  for g in grads:
    A, B = ref.scaled_gd_step(A, B, g, lr=0.05, reg=1e-2)
    expected.append((A, B))
  _assert_trajectories_close(got, expected, 1e-10)


def test_scaled_adamw_matches_the_reference():
  A, B, grads = _torch_problem(2, 7, 6, 3, steps=4)
  with jax.enable_x64(True):
    got = _run_torch_pair(ap.scaled_adamw(0.01, reg=0.5, eps=1e-6, weight_decay=0.1), A, B, grads)
  adam_a, adam_b, expected = ref.Adam(eps=1e-6), ref.Adam(eps=1e-6), []
  for g in grads:
    A, B = ref.scaled_adamw_step(A, B, g, adam_a, adam_b, lr=0.01, reg=0.5, weight_decay=0.1)
    expected.append((A, B))
  _assert_trajectories_close(got, expected, 1e-10)


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("damping,rtol", [(0.0, 1e-9), (1e-8, 1e-6)])
def test_lora_pro_matches_the_theorems(mode, damping, rtol):
  scale = 2.0
  A, B, grads = _torch_problem(3, 6, 5, 2, steps=3)
  with jax.enable_x64(True):
    tx = ap.lora_pro(0.01, mode, lora_scale=scale, damping=damping)
    got = _run_torch_pair(tx, A, B, grads, scale)
  expected = []
  adam_a, adam_b, adam_w = ref.Adam(), ref.Adam(), ref.Adam()
  for g in grads:
    if mode == "efficient":
      A, B = ref.lora_pro_efficient_step(A, B, g, adam_a, adam_b, lr=0.01, scale=scale)
    else:
      A, B = ref.lora_pro_full_step(A, B, g, adam_w, lr=0.01, scale=scale)
    expected.append((A, B))
  _assert_trajectories_close(got, expected, rtol)


def test_lora_pro_full_mode_keeps_weight_sized_float32_moments():
  params, loss = _quadratic_problem()
  tx = ap.scale_by_lora_pro("full")
  state = tx.init(params)
  assert state.pairs.mu["layer"]["lora_a"].shape == (10, 8)
  assert state.pairs.nu["layer"]["lora_a"].dtype == jnp.float32
  assert isinstance(state.pairs.mu["layer"]["lora_b"], optax.MaskedNode)
  efficient = ap.scale_by_lora_pro("efficient").init(params)
  assert efficient[0].pairs.mu is None


def test_lora_pro_at_b_zero_is_the_minimum_norm_solution():
  """b = 0: the Grams are singular; δa = 0 and δb = (aᵀa)⁻¹ g_b / s² for any g_a."""
  scale = 2.0
  rng = np.random.default_rng(4)
  A, _, (g,) = _torch_problem(4, 6, 5, 2, steps=1)
  B = np.zeros((6, 2))
  expected_a, expected_b = ref.lora_pro_projection(A, B, g, scale)
  with jax.enable_x64(True):
    tx = ap.scale_by_lora_pro("full", lora_scale=scale, damping=0.0)
    params = {"w": {"lora_a": jnp.asarray(A.T), "lora_b": jnp.asarray(B.T)}}
    grads = _factor_grads(params, {"w": jnp.asarray(g.T)}, scale)
    # A non-zero g_a (impossible for a true LoRA gradient at b = 0) must not
    # leak through a 1/damping inverse.
    grads["w"]["lora_a"] = jnp.asarray(rng.normal(size=(5, 2)))
    efficient = ap.scale_by_lora_pro("efficient", lora_scale=scale, damping=1e-8)
    efficient_updates, _ = efficient.update(grads, efficient.init(params), params)
    updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(efficient_updates["w"]["lora_a"]) == 0.0)
  assert np.all(np.asarray(updates["w"]["lora_a"]) == 0.0)
  np.testing.assert_allclose(expected_a, 0.0, atol=1e-12)
  # The W-space Adam direction of the first step is sign(G P_A) elementwise
  # (|m̂|/√v̂ = 1), projected back.
  direction = ref.Adam().direction(ref.tangent_projection(A, B, g))
  _, expected_full_b = ref.lora_pro_projection(A, B, direction, scale)
  np.testing.assert_allclose(np.asarray(updates["w"]["lora_b"]).T, expected_full_b, rtol=1e-9)
  closed_form_b = g @ A.T @ np.linalg.inv(A @ A.T) / scale
  np.testing.assert_allclose(expected_b, closed_form_b, rtol=1e-9)


@pytest.mark.parametrize("variant", ["defaults", "escape_and_capping", "skip_and_clip"])
def test_lora_rite_matches_the_reference(variant):
  options = dict(clip=1.0, skip=1.0, cap=None, escape=False)
  scales = (0.05, 0.1)
  if variant == "escape_and_capping":
    options.update(escape=True, cap=0.5)
  if variant == "skip_and_clip":
    # Pair 2's unmagnified gradient has RMS ≫ 1 (skipped); pair 1's joint
    # norm exceeds the clip threshold.
    options.update(clip=0.3)
    scales = (0.3, 3.0)
  rng = np.random.default_rng(5)
  shapes = ((7, 6, 2), (5, 8, 3))
  pairs = [(rng.normal(size=(m, r)), rng.normal(size=(n, r))) for m, n, r in shapes]
  grads = [
    [rng.normal(size=(m, n)) * s for (m, n, _), s in zip(shapes, scales, strict=True)]
    for _ in range(4)
  ]
  with jax.enable_x64(True):
    tx = ap.lora_rite(
      0.01,
      clip_unmagnified_grad=options["clip"],
      update_skipping=options["skip"],
      update_capping=options["cap"],
      escape_mass=options["escape"],
    )
    params = {
      f"p{i}": {"lora_a": jnp.asarray(A), "lora_b": jnp.asarray(B.T)}
      for i, (A, B) in enumerate(pairs)
    }
    trajectory, state = _run(
      tx, params, [{f"p{i}": jnp.asarray(g) for i, g in enumerate(step)} for step in grads]
    )
  states = [(ref.RiteFactorState(m, r), ref.RiteFactorState(n, r)) for m, n, r in shapes]
  for t, step in enumerate(grads, start=1):
    pairs = ref.lora_rite_steps(
      [(A, B, g) for (A, B), g in zip(pairs, step, strict=True)],
      states,
      t,
      lr=0.01,
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      **options,
    )
    for i, (A, B) in enumerate(pairs):
      got = trajectory[t - 1][f"p{i}"]
      _assert_trajectories_close(
        [(np.asarray(got["lora_a"]), np.asarray(got["lora_b"]).T)], [(A, B)], 1e-9
      )
  if variant == "skip_and_clip":
    # The skipped pair did not move at all.
    np.testing.assert_array_equal(
      np.asarray(trajectory[-1]["p1"]["lora_a"]), np.asarray(params["p1"]["lora_a"])
    )
  if variant == "escape_and_capping":
    escape_mass = optax.tree_utils.tree_get(state, "escape_mass")
    assert np.all(np.asarray(escape_mass["p0"]["lora_a"]) >= 0.0)
    assert float(escape_mass["p0"]["lora_a"]) > 0.0


def test_lora_rite_rejects_rank_above_the_factor_size():
  params = {"thin": {"lora_a": jnp.ones((3, 4)), "lora_b": jnp.ones((4, 8))}}
  with pytest.raises(ValueError, match="'thin/lora_a'.*rank 4, d_in 3"):
    ap.lora_rite(0.1).init(params)


# ----------------------------------------------- transformation invariance ----


def _weight_trajectory(tx, a, b, grads):
  params = {"w": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
  trajectory, _ = _run(tx, params, [{"w": jnp.asarray(g)} for g in grads])
  return [np.asarray(p["w"]["lora_a"]) @ np.asarray(p["w"]["lora_b"]) for p in trajectory]


def _weight_changes(tx, seed):
  """W_t − W_0 over 4 steps from (a, b) and from (a S, S⁻¹ b), same G_t."""
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(8, 3)), rng.normal(size=(3, 6))
  transform = rng.normal(size=(3, 3)) + 2.0 * np.eye(3)  # invertible, not orthogonal
  grads = [rng.normal(size=(8, 6)) * 0.3 for _ in range(4)]
  with jax.enable_x64(True):
    original = _weight_trajectory(tx, a, b, grads)
    transformed = _weight_trajectory(tx, a @ transform, np.linalg.solve(transform, b), grads)
  return [w - a @ b for w in original], [w - a @ b for w in transformed]


@pytest.mark.parametrize(
  "tx",
  [
    ap.lora_rite(0.02),
    ap.lora_rite(0.02, escape_mass=True, update_capping=0.5),
    ap.scaled_gd(0.02, reg=1e-12),
  ],
  ids=["lora_rite", "lora_rite_escape_capping", "scaled_gd"],
)
def test_weight_updates_are_invariant_to_the_factorization(tx):
  original, transformed = _weight_changes(tx, 6)
  for change, transformed_change in zip(original, transformed, strict=True):
    np.testing.assert_allclose(transformed_change, change, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
  "tx",
  [optax.adamw(0.02, weight_decay=0.0), ap.scaled_adamw(0.02, reg=1e-12)],
  ids=["adamw", "scaled_adamw"],
)
def test_adaptive_factor_updates_are_not_invariant(tx):
  original, transformed = _weight_changes(tx, 6)
  difference = np.linalg.norm(original[-1] - transformed[-1]) / np.linalg.norm(original[-1])
  assert difference > 0.1


# ---------------------------------------------------------------- numerics ----


@each_baseline
def test_b_zero_init_gives_finite_updates_that_move_b(name):
  params, loss = _quadratic_problem()
  tx = _make(name)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    for leaf in jax.tree.leaves(updates):
      assert np.all(np.isfinite(np.asarray(leaf)))
    params = optax.apply_updates(params, updates)
  assert np.any(np.asarray(params["layer"]["lora_b"]) != 0.0)


def _state_float_dtypes(state):
  return {
    leaf.dtype
    for leaf in jax.tree.leaves(state)
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim > 0
  }


@each_baseline
def test_bfloat16_params_keep_float32_state(name):
  params = {
    "p": {"lora_a": jnp.ones((8, 4), jnp.bfloat16) * 0.3, "lora_b": jnp.zeros((4, 6), jnp.bfloat16)}
  }
  rng = np.random.default_rng(7)
  tx = _make(name, learning_rate=1e-2)
  state = tx.init(params)
  for _ in range(3):
    g = jnp.asarray(rng.normal(size=(8, 6)), jnp.bfloat16)
    updates, state = tx.update(_factor_grads(params, {"p": g}), state, params)
    params = optax.apply_updates(params, updates)
  assert updates["p"]["lora_a"].dtype == jnp.bfloat16
  assert params["p"]["lora_b"].dtype == jnp.bfloat16
  stateless = name == "scaled_gd"
  assert _state_float_dtypes(state) == (set() if stateless else {jnp.dtype(jnp.float32)})
  assert np.all(np.isfinite(np.asarray(params["p"]["lora_a"], np.float32)))
  assert np.any(np.asarray(params["p"]["lora_b"], np.float32) != 0.0)


@hypothesis.settings(
  max_examples=12, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  name=st.sampled_from(list(BASELINES)),
  b_scale=st.sampled_from([0.0, 1e-12, 1e-4, 1.0]),
  grad_scale=st.sampled_from([0.0, 1e-30, 1.0, 1e8]),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  seed=st.integers(0, 1000),
)
def test_fuzz_baseline_updates_are_finite(name, b_scale, grad_scale, dtype, seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(9, 4))
  b = rng.normal(size=(4, 6)) * b_scale
  g = rng.normal(size=(9, 6)) * grad_scale
  params = {"p": {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}}
  grads = {"p": {"lora_a": jnp.asarray(g @ b.T, dtype), "lora_b": jnp.asarray(a.T @ g, dtype)}}
  tx = _make(name, learning_rate=1e-2)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    for leaf in jax.tree.leaves(updates):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@each_baseline
def test_resuming_from_a_host_copy_of_the_state_is_exact(name):
  """All state lives in the optax state (the LoRA-RITE reference loses its
  moments on load_state_dict): a numpy round trip resumes bit for bit."""
  params, loss = _quadratic_problem()
  tx = _make(name)
  update = jax.jit(tx.update)

  def steps(params, state, count):
    for _ in range(count):
      updates, state = update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  params, state = steps(params, tx.init(params), 2)
  restored = jax.tree.map(lambda x: jnp.asarray(np.array(x)), state)
  resumed, _ = steps(params, restored, 3)
  uninterrupted, _ = steps(params, state, 3)
  chex.assert_trees_all_equal(resumed, uninterrupted)


# ------------------------------------------------------------ layout, errors ----


@each_baseline
def test_peft_layout_and_stacked_layers_equal_single_flax_pairs(name):
  rng = np.random.default_rng(8)
  layers, d_in, d_out, rank = 2, 7, 5, 3
  a = rng.normal(size=(layers, d_in, rank)).astype(np.float32)
  b = rng.normal(size=(layers, rank, d_out)).astype(np.float32)
  g = rng.normal(size=(layers, d_in, d_out)).astype(np.float32)
  grad_a, grad_b = np.einsum("lij,lkj->lik", g, b), np.einsum("lia,lij->laj", a, g)
  stacked = {
    "lora_A": jnp.asarray(a).transpose(0, 2, 1),
    "lora_B": jnp.asarray(b).transpose(0, 2, 1),
  }
  stacked_grads = {
    "lora_A": jnp.asarray(grad_a).transpose(0, 2, 1),
    "lora_B": jnp.asarray(grad_b).transpose(0, 2, 1),
  }
  split = {
    f"l{i}": {"lora_a": jnp.asarray(a[i]), "lora_b": jnp.asarray(b[i])} for i in range(layers)
  }
  split_grads = {
    f"l{i}": {"lora_a": jnp.asarray(grad_a[i]), "lora_b": jnp.asarray(grad_b[i])}
    for i in range(layers)
  }
  peft_tx, flax_tx = _make(name, pairing="peft"), _make(name)
  peft_state, flax_state = peft_tx.init(stacked), flax_tx.init(split)
  for _ in range(2):
    peft_updates, peft_state = peft_tx.update(stacked_grads, peft_state, stacked)
    flax_updates, flax_state = flax_tx.update(split_grads, flax_state, split)
  for i in range(layers):
    np.testing.assert_allclose(
      np.asarray(peft_updates["lora_A"][i]).T,
      np.asarray(flax_updates[f"l{i}"]["lora_a"]),
      rtol=2e-4,
      atol=1e-7,
    )
    np.testing.assert_allclose(
      np.asarray(peft_updates["lora_B"][i]).T,
      np.asarray(flax_updates[f"l{i}"]["lora_b"]),
      rtol=2e-4,
      atol=1e-7,
    )


@each_baseline
def test_pairing_errors_name_the_parameter_path(name):
  params, loss = _quadratic_problem()
  with pytest.raises(ValueError, match="Unpaired LoRA factor 'layer/lora_a'"):
    _make(name).init({"layer": {"lora_a": params["layer"]["lora_a"]}})
  with pytest.raises(ValueError, match="not LoRA factors.*'head'"):
    _make(name, strict=True).init({**params, "head": jnp.ones(3)})
  tx = _make(name)
  grads = jax.grad(loss)(params)
  grads["layer"]["lora_b"] = jnp.zeros((3, 8))
  with pytest.raises(ValueError, match="'layer/lora_b' has shape"):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(jax.grad(loss)(params), tx.init(params))


@pytest.mark.parametrize(
  "factory,kwargs,match",
  [
    (ap.lora_plus, dict(lr_ratio=0.0), "lr_ratio"),
    (ap.scaled_gd, dict(reg=0.0), "reg"),
    (ap.scaled_adamw, dict(reg=-1.0), "reg"),
    (ap.lora_pro, dict(mode="fast"), "mode"),
    (ap.lora_pro, dict(lora_scale=0.0), "lora_scale"),
    (ap.lora_pro, dict(damping=-1e-3), "damping"),
    (ap.lora_rite, dict(clip_unmagnified_grad=0.0), "clip_unmagnified_grad"),
    (ap.lora_rite, dict(update_skipping=-1.0), "update_skipping"),
    (ap.lora_plus, dict(pairing="torch"), "pairing preset"),
  ],
)
def test_bad_hyperparameters_raise(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(0.1, **kwargs)


# ------------------------------------------------------- optax integration ----


@each_baseline
def test_chain_masked_and_training(name):
  params, loss = _quadratic_problem()
  params["frozen"] = {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))}

  def full_loss(p):
    return loss(p) + jnp.sum(p["frozen"]["lora_a"] @ p["frozen"]["lora_b"])

  mask = {"layer": {"lora_a": True, "lora_b": True}, "frozen": {"lora_a": False, "lora_b": False}}
  tx = optax.chain(
    optax.clip_by_global_norm(10.0),
    optax.masked(_make(name), mask),
    optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)),
  )
  state = tx.init(params)
  step = jax.jit(
    lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(full_loss)(p), s, p)
    )
  )
  initial = float(loss(params))
  for _ in range(60):
    params, state = step(params, state)
  assert np.all(np.asarray(params["frozen"]["lora_a"]) == 1.0)
  assert float(loss(params)) < 0.25 * initial


@each_baseline
def test_inject_hyperparams_changes_the_learning_rate_mid_run(name):
  factory, kwargs = BASELINES[name]
  tx = optax.inject_hyperparams(factory)(**kwargs)
  params, loss = _quadratic_problem()
  params["layer"]["lora_b"] = jnp.full_like(params["layer"]["lora_b"], 0.1)
  grads = jax.grad(loss)(params)
  state = tx.init(params)
  first, state = tx.update(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(kwargs["learning_rate"] / 10)
  second, _ = tx.update(grads, state, params)
  fixed = factory(**kwargs)
  fixed_state = fixed.init(params)
  expected_first, fixed_state = fixed.update(grads, fixed_state, params)
  expected_second, _ = fixed.update(grads, fixed_state, params)
  chex_close(first, expected_first, rtol=1e-5)
  chex_close(second, jax.tree.map(lambda u: u / 10, expected_second), rtol=1e-5)


@each_baseline
def test_schedules_set_the_step_size(name):
  schedule = optax.linear_schedule(0.1, 0.01, 3)
  scheduled, constant = _make(name, learning_rate=schedule), _make(name, learning_rate=1.0)
  params, loss = _quadratic_problem()
  params["layer"]["lora_b"] = jnp.full_like(params["layer"]["lora_b"], 0.1)
  grads = jax.grad(loss)(params)
  s, c = scheduled.init(params), constant.init(params)
  for step in range(3):
    updates, s = scheduled.update(grads, s, params)
    raw, c = constant.update(grads, c, params)
    chex_close(updates, optax.tree.scale(schedule(step), raw), rtol=1e-5)


@each_baseline
def test_llama_shapes_trace_with_defaults(name):
  """Rank 16, d up to 4096, two stacked layers; abstract evaluation only."""
  factory, kwargs = BASELINES[name]
  shapes = {"q": (4096, 4096), "up": (4096, 11008), "down": (11008, 4096)}
  params = {
    key: {
      "lora_a": jax.ShapeDtypeStruct((2, d_in, 16), jnp.bfloat16),
      "lora_b": jax.ShapeDtypeStruct((2, 16, d_out), jnp.bfloat16),
    }
    for key, (d_in, d_out) in shapes.items()
  }
  tx = factory(
    learning_rate=kwargs["learning_rate"], **({"mode": kwargs["mode"]} if "mode" in kwargs else {})
  )
  state = jax.eval_shape(tx.init, params)
  updates, _ = jax.eval_shape(jax.jit(tx.update), params, state, params)
  assert updates["down"]["lora_b"].shape == (2, 16, 4096)
  assert updates["down"]["lora_b"].dtype == jnp.bfloat16
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  lora_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
  if name == "lora_pro_full":
    assert state_bytes > 2 * 4 * 2 * 4096 * 11008  # full-size M and V
  else:
    assert state_bytes <= 2 * lora_bytes + 2 * 4 * 6 * 16 * 16 + 1024
