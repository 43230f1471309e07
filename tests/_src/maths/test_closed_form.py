"""adaprelora_jax._src.maths.closed_form against dense float64 oracles (tests/reference.py)."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaprelora_jax import factor_update
from adaprelora_jax._src.maths import closed_form
from adaprelora_jax._src.maths import linalg
from adaprelora_jax._src.maths import tangent
from tests import reference


def _pair_problem(seed, d_in, d_out, rank, *, condition=1.0, factor_condition=1.0):
  rng = np.random.default_rng(seed)
  a, b = reference.random_pair(rng, d_in, d_out, rank, factor_condition=factor_condition)
  grad_w = rng.normal(size=(d_in, d_out))
  p = reference.random_scales(rng, d_in, condition)
  q = reference.random_scales(rng, d_out, condition)
  return a, b, grad_w, p, q


def _update(a, b, grad_w, p, q, **kwargs):
  with jax.enable_x64(True):
    delta_a, delta_b = factor_update(
      jnp.asarray(a),
      jnp.asarray(b),
      jnp.asarray(grad_w @ b.T),
      jnp.asarray(a.T @ grad_w),
      jnp.asarray(p),
      jnp.asarray(q),
      **kwargs,
    )
    return np.asarray(delta_a), np.asarray(delta_b)


def _relative_error(x, y):
  return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("condition", [1.0, 1e3, 1e6])
def test_weight_update_is_the_h_projection(seed, condition):
  rng = np.random.default_rng(100 + seed)
  d_in, d_out = rng.integers(3, 9, size=2)
  rank = int(rng.integers(1, min(d_in, d_out) + 1))
  a, b, grad_w, p, q = _pair_problem(seed, d_in, d_out, rank, condition=condition)
  delta_a, delta_b = _update(a, b, grad_w, p, q)
  expected = reference.h_projection(a, b, grad_w, p, q)
  assert _relative_error(delta_a @ b + a @ delta_b, expected) < 1e-8


@pytest.mark.parametrize("tie_breaker", closed_form.TIE_BREAKERS)
def test_every_tie_breaker_gives_the_same_weight_update(tie_breaker):
  a, b, grad_w, p, q = _pair_problem(7, 6, 5, 3, condition=1e2)
  delta_a, delta_b = _update(a, b, grad_w, p, q, tie_breaker=tie_breaker)
  expected = reference.h_projection(a, b, grad_w, p, q)
  assert _relative_error(delta_a @ b + a @ delta_b, expected) < 1e-9


def test_lora_init_b_zero_moves_only_b():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(7, 3))
  b = np.zeros((3, 5))
  grad_w = rng.normal(size=(7, 5))
  p, q = reference.random_scales(rng, 7, 10.0), reference.random_scales(rng, 5, 10.0)
  delta_a, delta_b = _update(a, b, grad_w, p, q)
  assert np.all(delta_a == 0.0)
  # δb = S_a⁻¹ g_b / q (docs/design.md §3, degenerate case).
  expected_b = np.linalg.solve(a.T @ np.diag(p) @ a, a.T @ grad_w) / q
  np.testing.assert_allclose(delta_b, expected_b, rtol=1e-10)
  np.testing.assert_allclose(
    a @ delta_b, reference.h_projection(a, b, grad_w, p, q), rtol=1e-9, atol=1e-12
  )


@pytest.mark.parametrize("deficient", ["a", "b", "both"])
def test_rank_deficient_factors_are_exact(deficient):
  rng = np.random.default_rng(11)
  a, b = rng.normal(size=(8, 4)), rng.normal(size=(4, 6))
  if deficient in ("a", "both"):
    a[:, 3] = a[:, 0] - 2.0 * a[:, 1]
  if deficient in ("b", "both"):
    b[2] = 0.5 * b[1]
  grad_w = rng.normal(size=(8, 6))
  p, q = reference.random_scales(rng, 8, 30.0), reference.random_scales(rng, 6, 30.0)
  delta_a, delta_b = _update(a, b, grad_w, p, q)
  expected = reference.h_projection(a, b, grad_w, p, q)
  assert _relative_error(delta_a @ b + a @ delta_b, expected) < 1e-7


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
  "tie_breaker,criterion",
  [("equal_norms", reference.contribution_imbalance), ("factor_norm", None)],
)
def test_tie_breaker_matches_brute_force_search(seed, tie_breaker, criterion):
  rng = np.random.default_rng(200 + seed)
  d_in, d_out = rng.integers(3, 8, size=2)
  rank = int(rng.integers(1, min(d_in, d_out) + 1))
  a, b, grad_w, p, q = _pair_problem(seed, d_in, d_out, rank, condition=50.0)
  grad_a, grad_b = grad_w @ b.T, a.T @ grad_w
  if criterion is None:
    signed = reference.factor_norm_imbalance(p, q)
  else:
    signed = criterion(a, b, p, q)
  theta = reference.brute_force_theta(a, b, grad_a, grad_b, p, q, signed)
  expected_a, expected_b = reference.solution_family(a, b, grad_a, grad_b, p, q, theta)
  delta_a, delta_b = _update(a, b, grad_w, p, q, tie_breaker=tie_breaker)
  # The grid has spacing 5e-5 in θ: compare at that resolution.
  scale = np.linalg.norm(expected_a) + np.linalg.norm(expected_b)
  error = np.linalg.norm(delta_a - expected_a) + np.linalg.norm(delta_b - expected_b)
  assert error <= 1e-3 * scale
  assert abs(signed(delta_a, delta_b)) <= abs(signed(expected_a, expected_b)) + 1e-9 * scale**2


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4])
def test_second_order_tie_breaker_matches_brute_force_search(seed, condition):
  """θ minimizes ‖δa δb‖_H over the family on [0, 1] (dense grid oracle)."""
  rng = np.random.default_rng(300 + seed)
  d_in, d_out = rng.integers(3, 10, size=2)
  rank = int(rng.integers(1, min(d_in, d_out)))  # LoRA: rank < min(d_in, d_out)
  a, b, grad_w, p, q = _pair_problem(seed, d_in, d_out, rank, condition=condition)
  grad_w *= np.outer(p, q)  # Adafactor-consistent: H⁻¹G of order one
  grad_a, grad_b = grad_w @ b.T, a.T @ grad_w
  criterion = reference.second_order_term(p, q)
  theta = reference.brute_force_theta(a, b, grad_a, grad_b, p, q, criterion)
  expected = criterion(*reference.solution_family(a, b, grad_a, grad_b, p, q, theta))
  with jax.enable_x64(True):
    step = closed_form.factor_step(
      *(jnp.asarray(x) for x in (a, b, grad_a, grad_b, p, q)),
      tie_breaker="second_order",
      pseudo_inverse=True,
    )
  got = criterion(np.asarray(step.delta_a), np.asarray(step.delta_b))
  # The closed form is exact; the grid (spacing 5e-5) can only be worse.
  assert got <= expected * (1.0 + 1e-9)
  assert abs(float(step.theta) - theta) < 1e-3


@pytest.mark.parametrize("condition", [1.0, 1e3])
def test_second_order_tie_breaker_gives_the_closest_finite_step(condition):
  """Its finite step deviates least from the exact step −η δW, for every η."""
  for seed in range(5):
    a, b, grad_w, p, q = _pair_problem(400 + seed, 9, 7, 3, condition=condition)
    deviations = {}
    for tie_breaker in closed_form.TIE_BREAKERS:
      delta_a, delta_b = _update(a, b, grad_w, p, q, tie_breaker=tie_breaker)
      delta_w = delta_a @ b + a @ delta_b
      deviations[tie_breaker] = [
        reference.h_norm_sq((a - lr * delta_a) @ (b - lr * delta_b) - a @ b + lr * delta_w, p, q)
        for lr in (1e-3, 1e-1, 1.0)
      ]
    for tie_breaker, values in deviations.items():
      assert np.all(np.asarray(deviations["second_order"]) <= np.asarray(values) * (1 + 1e-9)), (
        tie_breaker
      )


def test_half_tie_breaker_is_theta_one_half():
  a, b, grad_w, p, q = _pair_problem(5, 6, 4, 2, condition=10.0)
  expected = reference.solution_family(a, b, grad_w @ b.T, a.T @ grad_w, p, q, 0.5)
  got = _update(a, b, grad_w, p, q, tie_breaker="half")
  for x, y in zip(got, expected, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


def test_equal_norms_theta_is_clipped_to_unit_interval():
  # A pair where one factor is far larger than the other: θ* lies outside
  # [0, 1] and the rule must pick the endpoint.
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 2)) * 100.0, rng.normal(size=(2, 5)) * 0.01
  grad_w = rng.normal(size=(6, 5))
  p, q = np.ones(6), np.ones(5)
  with jax.enable_x64(True):
    step = closed_form.factor_step(
      *(jnp.asarray(x) for x in (a, b, grad_w @ b.T, a.T @ grad_w, p, q)), tie_breaker="equal_norms"
    )
  assert float(step.theta) in (0.0, 1.0)


@pytest.mark.parametrize("tie_breaker", closed_form.TIE_BREAKERS)
def test_gauge_invariance_of_the_whole_step(tie_breaker):
  """(a S, S⁻¹ b) gives the same first-order δW and the same full update."""
  rng = np.random.default_rng(42)
  a, b, grad_w, p, q = _pair_problem(42, 7, 6, 3, condition=100.0)
  gauge = rng.normal(size=(3, 3)) + 3.0 * np.eye(3)
  a2, b2 = a @ gauge, np.linalg.solve(gauge, b)
  lr = 0.1
  da, db = _update(a, b, grad_w, p, q, tie_breaker=tie_breaker)
  da2, db2 = _update(a2, b2, grad_w, p, q, tie_breaker=tie_breaker)
  np.testing.assert_allclose(da2 @ b2 + a2 @ db2, da @ b + a @ db, rtol=1e-8, atol=1e-10)
  if tie_breaker != "factor_norm":  # θ* depends only on gauge-invariant traces.
    np.testing.assert_allclose(
      (a2 - lr * da2) @ (b2 - lr * db2), (a - lr * da) @ (b - lr * db), rtol=1e-8, atol=1e-10
    )


@pytest.mark.parametrize("damping,floor", [(0.0, 0.0), (1e-4, 1e-8), (1e-2, 1e-3)])
def test_descent_direction(damping, floor):
  for seed in range(5):
    a, b, grad_w, p, q = _pair_problem(seed, 9, 7, 3, condition=1e4, factor_condition=1e3)
    with jax.enable_x64(True):
      step = closed_form.factor_step(
        *(jnp.asarray(x) for x in (a, b, grad_w @ b.T, a.T @ grad_w, p, q)),
        damping=damping,
        damping_floor=floor,
        pseudo_inverse=(damping == 0.0),
      )
    delta_w = np.asarray(step.delta_a) @ b + a @ np.asarray(step.delta_b)
    inner = float(np.sum(grad_w * delta_w))
    assert inner > 0.0
    np.testing.assert_allclose(float(step.descent), inner, rtol=1e-9)
    if damping == 0.0:
      # cond(S_a) reaches ~1e10 here (H condition 1e4, factors 1e3): float64
      # leaves about 1e-6 relative accuracy.
      np.testing.assert_allclose(inner, reference.h_norm_sq(delta_w, p, q), rtol=1e-6)


def test_damped_update_stays_bounded_as_b_vanishes():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(6, 2))
  b0 = rng.normal(size=(2, 5))
  grad_w = rng.normal(size=(6, 5))
  p, q = np.ones(6), np.ones(5)
  norms = []
  for scale in [1.0, 1e-2, 1e-4, 1e-6, 1e-8, 1e-12, 0.0]:
    b = scale * b0
    da, db = _update(a, b, grad_w, p, q, damping=1e-4, damping_floor=1e-8)
    assert np.all(np.isfinite(da)) and np.all(np.isfinite(db))
    norms.append(np.linalg.norm(da))
  # ‖δa‖ peaks near ‖b‖² ~ floor and then decays to 0 with b (it would grow
  # like 1/‖b‖ without the floor).
  assert max(norms) < 1e5
  assert norms[-1] == 0.0 and norms[-2] < 1e-2


def test_undamped_exact_step_grows_without_floor():
  """Documents why the transform needs the floor: the exact step ∝ 1/‖b‖."""
  rng = np.random.default_rng(1)
  a, b0 = rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
  grad_w = rng.normal(size=(6, 5))
  small = _update(a, 1e-6 * b0, grad_w, np.ones(6), np.ones(5))[0]
  large = _update(a, b0, grad_w, np.ones(6), np.ones(5))[0]
  assert np.linalg.norm(small) > 1e5 * np.linalg.norm(large)


def test_zero_gradients_give_zero_update():
  a, b, _, p, q = _pair_problem(0, 5, 4, 2)
  da, db = _update(a, b, np.zeros((5, 4)), p, q, damping=1e-4, damping_floor=1e-8)
  assert np.all(da == 0.0) and np.all(db == 0.0)


def test_leading_axes_are_mapped():
  rng = np.random.default_rng(5)
  problems = [_pair_problem(s, 5, 4, 2, condition=10.0) for s in range(3)]
  stacked = [np.stack(parts) for parts in zip(*problems, strict=True)]
  a, b, grad_w, p, q = stacked
  with jax.enable_x64(True):
    da, db = factor_update(
      jnp.asarray(a),
      jnp.asarray(b),
      jnp.asarray(np.einsum("lij,lkj->lik", grad_w, b)),
      jnp.asarray(np.einsum("lia,lij->laj", a, grad_w)),
      jnp.asarray(p),
      jnp.asarray(q),
    )
  for layer, problem in enumerate(problems):
    expected = _update(*problem)
    np.testing.assert_allclose(np.asarray(da[layer]), expected[0], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(db[layer]), expected[1], rtol=1e-10)
  del rng


def test_float32_inputs_match_the_oracle():
  a, b, grad_w, p, q = _pair_problem(2, 6, 5, 2, condition=10.0)
  expected = reference.h_projection(a, b, grad_w, p, q)
  args = [jnp.asarray(x, jnp.float32) for x in (a, b, grad_w @ b.T, a.T @ grad_w, p, q)]
  da, db = factor_update(*args)
  assert da.dtype == jnp.float32 and db.dtype == jnp.float32
  got = np.asarray(da, np.float64) @ b + a @ np.asarray(db, np.float64)
  assert _relative_error(got, expected) < 1e-4


def test_bfloat16_inputs_are_computed_in_float32():
  """bf16 factors: the algebra runs in float32, only the result is rounded."""
  a, b, grad_w, p, q = _pair_problem(2, 6, 5, 2, condition=10.0)
  args = [jnp.asarray(x, jnp.bfloat16) for x in (a, b, grad_w @ b.T, a.T @ grad_w, p, q)]
  da, db = factor_update(*args, damping=1e-4, damping_floor=1e-8)
  assert da.dtype == jnp.bfloat16 and db.dtype == jnp.bfloat16
  da32, db32 = factor_update(
    *(x.astype(jnp.float32) for x in args), damping=1e-4, damping_floor=1e-8
  )
  np.testing.assert_array_equal(np.asarray(da), np.asarray(da32.astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(db), np.asarray(db32.astype(jnp.bfloat16)))


@pytest.mark.parametrize("bad", ["shape", "rank", "dtype", "tie_breaker"])
def test_factor_update_rejects_bad_input(bad):
  a, b = jnp.ones((4, 2)), jnp.ones((2, 3))
  args = dict(lora_a=a, lora_b=b, grad_a=a, grad_b=b, row_scale=jnp.ones(4), col_scale=jnp.ones(3))
  kwargs = {}
  if bad == "shape":
    args["row_scale"] = jnp.ones(5)
    match = "row_scale has shape"
  elif bad == "rank":
    args["lora_b"] = jnp.ones((3, 3))
    match = "does not match lora_a"
  elif bad == "dtype":
    args["grad_a"] = jnp.ones((4, 2), jnp.int32)
    match = "floating dtype"
  else:
    kwargs["tie_breaker"] = "nearest"
    match = "tie_breaker must be one of"
  with pytest.raises(ValueError, match=match):
    factor_update(**args, **kwargs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("deficient_b", [False, True])
def test_tangent_statistics_match_dense_projection(seed, deficient_b):
  rng = np.random.default_rng(300 + seed)
  d_in, d_out, rank = 9, 7, 3
  a, b = rng.normal(size=(d_in, rank)), rng.normal(size=(rank, d_out))
  if deficient_b:
    b[2] = 0.0
  grad_w = rng.normal(size=(d_in, d_out))
  projected = reference.tangent_projection(a, b, grad_w)
  with jax.enable_x64(True):
    rows, cols = tangent.tangent_gradient_statistics(
      *(jnp.asarray(x) for x in (a, b, grad_w @ b.T, a.T @ grad_w)),
      damping=1e-12,
      damping_floor=1e-14,
    )
  # The damped projector differs from the exact one by O(damping) only in
  # the directions that exist; the deficient direction has zero gradient.
  np.testing.assert_allclose(np.asarray(rows), np.mean(projected**2, axis=1), rtol=1e-6, atol=1e-10)
  np.testing.assert_allclose(np.asarray(cols), np.mean(projected**2, axis=0), rtol=1e-6, atol=1e-10)


def test_tangent_statistics_of_inconsistent_gradients_are_those_of_the_orthogonal_split():
  """Factor gradients of no single G (e.g. after a per-leaf transform).

  The statistics are then the row sums of the two parts ``G P_b`` and
  ``P_a G (I − P_b)`` (columns: ``P_a G`` and ``(I − P_a) G P_b``) built from
  g_a, g_b as for one ``G`` (tests/reference.py::tangent_split_statistics);
  in float32 none may collapse to zero (which made one row of H⁻¹ explode,
  1e7-sized steps).
  """
  rng = np.random.default_rng(11)
  d_in, d_out, rank = 256, 192, 4
  a, b = rng.normal(size=(d_in, rank)), 0.1 * rng.normal(size=(rank, d_out))
  g_a, g_b = rng.normal(size=(d_in, rank)), 0.1 * rng.normal(size=(rank, d_out))
  rows, cols = tangent.tangent_gradient_statistics(
    *(jnp.asarray(x, jnp.float32) for x in (a, b, g_a, g_b)), damping=1e-7, damping_floor=1e-12
  )
  want_rows, want_cols = reference.tangent_split_statistics(a, b, g_a, g_b)
  np.testing.assert_allclose(np.asarray(rows), want_rows, rtol=2e-2, atol=1e-3 * want_rows.mean())
  np.testing.assert_allclose(np.asarray(cols), want_cols, rtol=2e-2, atol=1e-3 * want_cols.mean())
  assert np.asarray(rows).min() > 0.1 * want_rows.min()
  assert np.asarray(cols).min() > 0.1 * want_cols.min()


def _rank_2r_statistics(a, b, g_a, g_b, damping, damping_floor):
  """The former implementation: row and column norms of the rank-2r product."""
  inverse_a = linalg.psd_inverse(a.T @ a, damping=damping, damping_floor=damping_floor)
  inverse_b = linalg.psd_inverse(b @ b.T, damping=damping, damping_floor=damping_floor)
  coefficient_b = inverse_b @ b
  coefficient_a = inverse_a @ (g_b - (a.T @ g_a) @ coefficient_b)
  left = jnp.concatenate([a, g_a], axis=1)
  right = jnp.concatenate([coefficient_a, coefficient_b], axis=0)
  rows = jnp.sum(left @ (right @ right.T) * left, axis=1) / b.shape[1]
  cols = jnp.sum((left.T @ left) @ right * right, axis=0) / a.shape[0]
  return rows, cols


@hypothesis.settings(
  max_examples=30, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  d_in=st.integers(2, 24),
  d_out=st.integers(2, 24),
  rank=st.integers(1, 8),
  factor_condition=st.sampled_from([1.0, 10.0, 1e3]),
  seed=st.integers(0, 2**16),
)
def test_tangent_statistics_equal_the_rank_2r_form_for_consistent_gradients(
  d_in, d_out, rank, factor_condition, seed
):
  """The orthogonal split gives the former rank-2r values for one G."""
  hypothesis.assume(rank <= min(d_in, d_out))
  rng = np.random.default_rng(seed)
  a, b = reference.random_pair(rng, d_in, d_out, rank, factor_condition=factor_condition)
  grad_w = rng.normal(size=(d_in, d_out))
  with jax.enable_x64(True):
    args = [jnp.asarray(x) for x in (a, b, grad_w @ b.T, a.T @ grad_w)]
    got = tangent.tangent_gradient_statistics(*args, damping=0.0, damping_floor=0.0)
    expected = _rank_2r_statistics(*args, 0.0, 0.0)
  for x, y in zip(got, expected, strict=True):
    scale = float(np.max(np.asarray(y)))
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=0, atol=1e-12 * scale * factor_condition**4
    )


@hypothesis.settings(
  max_examples=30, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  d_in=st.sampled_from([3, 17, 40]),
  d_out=st.sampled_from([2, 5, 33]),
  rank=st.sampled_from([1, 2, 8]),
  factor_scale=st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
  grad_scale=st.sampled_from([0.0, 1e-6, 1.0, 1e6]),
  seed=st.integers(0, 2**16),
)
def test_tangent_statistics_are_non_negative_for_any_factor_gradients(
  d_in, d_out, rank, factor_scale, grad_scale, seed
):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d_in, rank))
  b = rng.normal(size=(rank, d_out)) * factor_scale
  g_a, g_b = (rng.normal(size=x.shape) * grad_scale for x in (a, b))
  rows, cols = tangent.tangent_gradient_statistics(
    *(jnp.asarray(x, jnp.float32) for x in (a, b, g_a, g_b)), damping=1e-4, damping_floor=1e-8
  )
  for x in (rows, cols):
    assert np.all(np.isfinite(np.asarray(x))) and np.all(np.asarray(x) >= 0.0)


@hypothesis.settings(
  max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  d_in=st.integers(1, 24),
  d_out=st.integers(1, 24),
  rank=st.integers(1, 8),
  factor_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
  consistent=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_surrogate_statistics_match_the_dense_surrogate(
  d_in, d_out, rank, factor_scale, consistent, seed
):
  """Row and column means of the dense ``G̃ = g_a b + a g_b``, for the
  gradients of one G and for factor gradients of no single G."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d_in, rank))
  b = rng.normal(size=(rank, d_out)) * factor_scale
  if consistent:
    grad_w = rng.normal(size=(d_in, d_out))
    g_a, g_b = grad_w @ b.T, a.T @ grad_w
  else:
    g_a, g_b = rng.normal(size=a.shape), rng.normal(size=b.shape)
  dense = reference.surrogate_gradient(a, b, g_a, g_b)
  with jax.enable_x64(True):
    rows, cols = tangent.surrogate_gradient_statistics(*(jnp.asarray(x) for x in (a, b, g_a, g_b)))
  scale = max(float(np.mean(dense**2, axis=1).max()), 1e-300)
  np.testing.assert_allclose(
    np.asarray(rows), np.mean(dense**2, axis=1), rtol=1e-9, atol=1e-12 * scale
  )
  scale = max(float(np.mean(dense**2, axis=0).max()), 1e-300)
  np.testing.assert_allclose(
    np.asarray(cols), np.mean(dense**2, axis=0), rtol=1e-9, atol=1e-12 * scale
  )


def test_surrogate_statistics_scale_with_the_factors_and_tangent_ones_do_not():
  """docs/design.md §5: for one G, ``(c a, c b)`` gives factor gradients ×c
  and ``G̃ = G bᵀb + a aᵀG`` ×c², so its squared means ×c⁴; the tangent
  projection of G does not depend on the factors' scale."""
  rng = np.random.default_rng(21)
  a, b = rng.normal(size=(9, 3)), rng.normal(size=(3, 7))
  grad_w = rng.normal(size=(9, 7))
  c = 3.0

  def statistics(fn, a, b, **kw):
    with jax.enable_x64(True):
      args = (jnp.asarray(x) for x in (a, b, grad_w @ b.T, a.T @ grad_w))
      return [np.asarray(x) for x in fn(*args, **kw)]

  damped = dict(damping=0.0, damping_floor=0.0)
  surrogate = statistics(tangent.surrogate_gradient_statistics, a, b)
  scaled = statistics(tangent.surrogate_gradient_statistics, c * a, c * b)
  tangent_stats = statistics(tangent.tangent_gradient_statistics, a, b, **damped)
  tangent_scaled = statistics(tangent.tangent_gradient_statistics, c * a, c * b, **damped)
  for x, y in zip(scaled, surrogate, strict=True):
    np.testing.assert_allclose(x, c**4 * y, rtol=1e-10)
  for x, y in zip(tangent_scaled, tangent_stats, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-8)


def test_tangent_statistics_at_b_zero_are_those_of_p_a_g():
  rng = np.random.default_rng(9)
  a, b = rng.normal(size=(6, 2)), np.zeros((2, 4))
  grad_w = rng.normal(size=(6, 4))
  projected = a @ np.linalg.pinv(a) @ grad_w
  rows, cols = tangent.tangent_gradient_statistics(
    *(jnp.asarray(x, jnp.float32) for x in (a, b, grad_w @ b.T, a.T @ grad_w)),
    damping=1e-4,
    damping_floor=1e-8,
  )
  # Relative damping 1e-4 shrinks the projector by ~damping·tr(aᵀa)/σ_min².
  np.testing.assert_allclose(np.asarray(rows), np.mean(projected**2, axis=1), rtol=5e-3)
  np.testing.assert_allclose(np.asarray(cols), np.mean(projected**2, axis=0), rtol=5e-3)


def test_factored_scales_reproduce_adafactor():
  rng = np.random.default_rng(4)
  grad_w = rng.normal(size=(6, 5))
  rows, cols = np.mean(grad_w**2, axis=1), np.mean(grad_w**2, axis=0)
  p, q = closed_form.factored_scales(jnp.asarray(rows), jnp.asarray(cols))
  # optax scale_by_factored_rms on the full gradient is G / (p qᵀ).
  import optax

  tx = optax.scale_by_factored_rms(min_dim_size_to_factor=1, epsilon=0.0)
  g = jnp.asarray(grad_w, jnp.float32)
  adafactor_step, _ = tx.update(g, tx.init(g), g)
  np.testing.assert_allclose(
    np.asarray(grad_w / np.outer(p, q)), np.asarray(adafactor_step), rtol=1e-5
  )


def test_psd_inverse_modes():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3))
  gram = jnp.asarray(x.T @ x)
  with jax.enable_x64(True):
    gram = jnp.asarray(x.T @ x)
    np.testing.assert_allclose(
      np.asarray(linalg.psd_inverse(gram, pseudo_inverse=True)), np.linalg.inv(x.T @ x), rtol=1e-10
    )
    damped = linalg.psd_inverse(gram, damping=0.1, damping_floor=0.5)
    shift = 0.1 * np.trace(x.T @ x) / 3 + 0.5
    np.testing.assert_allclose(
      np.asarray(damped), np.linalg.inv(x.T @ x + shift * np.eye(3)), rtol=1e-10
    )
    singular = jnp.zeros((3, 3))
    assert np.all(np.asarray(linalg.psd_inverse(singular, pseudo_inverse=True)) == 0.0)


# Sizes come from small sets so that compiled shapes are reused across examples.
@hypothesis.settings(
  max_examples=50, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  d_in=st.sampled_from([1, 3, 17, 40]),
  d_out=st.sampled_from([1, 5, 33]),
  rank=st.sampled_from([1, 2, 8, 32]),
  factor_scale=st.sampled_from([0.0, 1e-8, 1e-3, 1.0, 1e3]),
  grad_scale=st.sampled_from([0.0, 1e-20, 1e-6, 1.0, 1e6]),
  condition=st.sampled_from([1.0, 1e2, 1e6]),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  tie_breaker=st.sampled_from(closed_form.TIE_BREAKERS),
  seed=st.integers(0, 2**16),
)
def test_fuzz_damped_update_is_finite(
  d_in, d_out, rank, factor_scale, grad_scale, condition, dtype, tie_breaker, seed
):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d_in, rank))
  b = rng.normal(size=(rank, d_out)) * factor_scale
  grad_w = rng.normal(size=(d_in, d_out)) * grad_scale
  p = reference.random_scales(rng, d_in, condition)
  q = reference.random_scales(rng, d_out, condition)
  args = [jnp.asarray(x, dtype) for x in (a, b, grad_w @ b.T, a.T @ grad_w, p, q)]
  da, db = factor_update(*args, damping=1e-4, damping_floor=1e-8, tie_breaker=tie_breaker)
  assert np.all(np.isfinite(np.asarray(da, np.float32)))
  assert np.all(np.isfinite(np.asarray(db, np.float32)))


def test_no_tpu_unsafe_primitives_in_the_kernels():
  a, b = jnp.ones((6, 2)), jnp.ones((2, 5))
  args = (a, b, a, b, jnp.ones(6), jnp.ones(5))
  forbidden = {"eig", "pure_callback", "io_callback", "callback", "debug_callback"}
  for tie_breaker in closed_form.TIE_BREAKERS:
    jaxpr = jax.make_jaxpr(
      functools.partial(
        closed_form.factor_step, damping=1e-4, damping_floor=1e-8, tie_breaker=tie_breaker
      )
    )(*args)
    assert not forbidden & _primitives(jaxpr.jaxpr)
  jaxpr = jax.make_jaxpr(
    lambda *x: tangent.tangent_gradient_statistics(*x, damping=1e-4, damping_floor=1e-8)
  )(*args[:4])
  assert not forbidden & _primitives(jaxpr.jaxpr)


def _primitives(jaxpr) -> set[str]:
  names = set()
  for equation in jaxpr.eqns:
    names.add(equation.primitive.name)
    for value in equation.params.values():
      inner = getattr(value, "jaxpr", None)
      if inner is not None:
        names |= _primitives(getattr(inner, "jaxpr", inner))
  return names


def _random_problem(rng, d_in, d_out, rank, condition, consistent):
  """A pair, factor gradients (those of one G, or perturbed) and scales."""
  a, b = reference.random_pair(rng, d_in, d_out, rank, factor_condition=10.0)
  grad_w = rng.normal(size=(d_in, d_out))
  grad_a, grad_b = grad_w @ b.T, a.T @ grad_w
  if not consistent:
    grad_a = grad_a + rng.normal(size=grad_a.shape)
    grad_b = grad_b + rng.normal(size=grad_b.shape)
  p = reference.random_scales(rng, d_in, condition)
  q = reference.random_scales(rng, d_out, condition)
  return a, b, grad_a, grad_b, p, q


def _factor_update64(*arrays, **kwargs):
  with jax.enable_x64(True):
    delta_a, delta_b = factor_update(*(jnp.asarray(x) for x in arrays), **kwargs)
    return np.asarray(delta_a), np.asarray(delta_b)


def _close(got, expected, tolerance):
  for x, y in zip(got, expected, strict=True):
    assert _relative_error(x, y) < tolerance, _relative_error(x, y)


@hypothesis.settings(
  max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  d_in=st.integers(1, 20),
  d_out=st.integers(1, 20),
  rank=st.integers(1, 16),
  condition=st.sampled_from([1.0, 1e2, 1e4, 1e6]),
  consistent=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_paper_rule_is_the_brute_force_gauge_minimizer(
  d_in, d_out, rank, condition, consistent, seed
):
  """The default rule is argmin_X ‖(δa + aX) b − a (δb − Xb)‖_H (dense lstsq).

  Over the §3 family as given, for factor gradients of one G and for others
  (``project_gradients=False`` keeps them as they are).
  """
  hypothesis.assume(rank <= min(d_in, d_out))
  rng = np.random.default_rng(seed)
  problem = _random_problem(rng, d_in, d_out, rank, condition, consistent)
  expected = reference.min_imbalance_member(*problem)
  got = _factor_update64(*problem, project_gradients=False)
  # cond(S_a) reaches ~1e8 (H condition 1e6, factors 10): float64 leaves
  # about 1e-8 relative accuracy.
  _close(got, expected, 1e-6)
  if consistent:
    _close(got, reference.solution_family(*problem, 0.5), 1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_paper_rule_is_theta_one_half_for_backprop_gradients(seed):
  rng = np.random.default_rng(500 + seed)
  problem = _random_problem(rng, 9, 7, 3, 1e3, consistent=True)
  half = reference.solution_family(*problem, 0.5)
  _close(_factor_update64(*problem), half, 1e-9)
  with jax.enable_x64(True):
    step = closed_form.factor_step(*(jnp.asarray(x) for x in problem), pseudo_inverse=True)
  assert float(step.theta) == 0.5


@pytest.mark.parametrize("consistent", [True, False])
def test_paper_rule_is_gauge_equivariant(consistent):
  """(a S, S⁻¹ b) with chain-rule gradients gives (δa S, S⁻¹ δb)."""
  rng = np.random.default_rng(17)
  a, b, grad_a, grad_b, p, q = _random_problem(rng, 8, 6, 3, 1e2, consistent)
  gauge = rng.normal(size=(3, 3)) + 3.0 * np.eye(3)
  inverse = np.linalg.inv(gauge)
  delta_a, delta_b = _factor_update64(a, b, grad_a, grad_b, p, q, project_gradients=False)
  moved = _factor_update64(
    a @ gauge, inverse @ b, grad_a @ inverse.T, gauge.T @ grad_b, p, q, project_gradients=False
  )
  _close(moved, (delta_a @ gauge, inverse @ delta_b), 1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(7, 5, 2), (9, 12, 4), (4, 4, 4), (6, 3, 1)])
def test_consistent_gradients_is_the_dense_null_space_projection(seed, shape):
  rng = np.random.default_rng(600 + seed)
  d_in, d_out, rank = shape
  a, b, grad_a, grad_b, _, _ = _random_problem(rng, d_in, d_out, rank, 1.0, consistent=False)
  expected = reference.consistent_projection(a, b, grad_a, grad_b)
  with jax.enable_x64(True):
    got = tangent.consistent_gradients(*(jnp.asarray(x) for x in (a, b, grad_a, grad_b)))
  _close([np.asarray(x) for x in got], expected, 1e-9)
  projected_a, projected_b = expected
  np.testing.assert_allclose(a.T @ projected_a, projected_b @ b.T, atol=1e-9)


def test_consistent_gradients_leave_backprop_gradients_unchanged():
  rng = np.random.default_rng(7)
  a, b, grad_a, grad_b, _, _ = _random_problem(rng, 10, 8, 3, 1.0, consistent=True)
  with jax.enable_x64(True):
    got = tangent.consistent_gradients(*(jnp.asarray(x) for x in (a, b, grad_a, grad_b)))
  _close([np.asarray(x) for x in got], (grad_a, grad_b), 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_default_step_of_inconsistent_gradients_is_that_of_their_projection(seed):
  rng = np.random.default_rng(700 + seed)
  a, b, grad_a, grad_b, p, q = _random_problem(rng, 8, 7, 3, 1e2, consistent=False)
  projected = reference.consistent_projection(a, b, grad_a, grad_b)
  expected = reference.min_imbalance_member(a, b, *projected, p, q)
  _close(_factor_update64(a, b, grad_a, grad_b, p, q), expected, 1e-8)


def test_old_rule_name_raises_and_names_the_new_ones():
  a, b = jnp.ones((4, 2)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="renamed 'equal_norms'.*'min_imbalance'"):
    factor_update(a, b, a, b, jnp.ones(4), jnp.ones(3), tie_breaker="imbalance")


def test_traced_zero_damping_is_exact():
  """Regression: a traced damping of 0 gave all-NaN steps at lora_b = 0."""
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(7, 3)).astype(np.float32), np.zeros((3, 5), np.float32)
  grad_w = rng.normal(size=(7, 5)).astype(np.float32)
  args = [jnp.asarray(x) for x in (a, b, grad_w @ b.T, a.T @ grad_w, np.ones(7), np.ones(5))]
  eager = factor_update(*args, damping=0.0, damping_floor=0.0)
  traced = jax.jit(lambda *x, d: factor_update(*x, damping=d, damping_floor=d))(*args, d=0.0)
  for x, y in zip(traced, eager, strict=True):
    assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  damped = jax.jit(lambda *x, d: factor_update(*x, damping=d, damping_floor=d))(*args, d=1e-4)
  expected = factor_update(*args, damping=1e-4, damping_floor=1e-4)
  for x, y in zip(damped, expected, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


@pytest.mark.parametrize("deficient", ["a", "b", "b_zero", "both"])
def test_consistent_gradients_project_out_the_larger_null_space_of_deficient_factors(deficient):
  """Rank-deficient factors: the null space of J also holds δa with δa b = 0."""
  rng = np.random.default_rng(13)
  a, b = rng.normal(size=(7, 3)), rng.normal(size=(3, 6))
  if deficient in ("a", "both"):
    a[:, 2] = a[:, 0] - a[:, 1]
  if deficient in ("b", "both"):
    b[1] = 3.0 * b[0]
  if deficient == "b_zero":
    b[:] = 0.0
  grad_a, grad_b = rng.normal(size=a.shape), rng.normal(size=b.shape)
  expected = reference.consistent_projection(a, b, grad_a, grad_b)
  with jax.enable_x64(True):
    got = tangent.consistent_gradients(*(jnp.asarray(x) for x in (a, b, grad_a, grad_b)))
  for x, y in zip(got, expected, strict=True):
    np.testing.assert_allclose(np.asarray(x), y, atol=1e-10)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_consistent_gradients_keep_non_finite_entries_visible(value):
  """A dropped null-space component must not hide a NaN from the skip policy."""
  a, b = jnp.ones((4, 2)).at[0, 1].set(3.0), jnp.zeros((2, 3))
  grad_a = jnp.zeros((4, 2)).at[1, 0].set(value)
  projected_a, _ = tangent.consistent_gradients(a, b, grad_a, jnp.ones((2, 3)))
  assert not np.all(np.isfinite(np.asarray(projected_a)))
