"""The shared-Gram kernels (adaprelora_jax._src.maths.closed_form) against the per-call ones."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaprelora_jax._src.maths import closed_form
from adaprelora_jax._src.maths import tangent
from tests import reference

DAMPING = dict(damping=1e-4, damping_floor=1e-8)


def _pair(rng, d_in, d_out, rank, *, consistent, factor_condition=3.0):
  a, b = reference.random_pair(rng, d_in, d_out, rank, factor_condition=factor_condition)
  grad_w = rng.normal(size=(d_in, d_out))
  grad_a, grad_b = grad_w @ b.T, a.T @ grad_w
  if not consistent:
    grad_a = grad_a + rng.normal(size=grad_a.shape)
    grad_b = grad_b + rng.normal(size=grad_b.shape)
  return a, b, grad_a, grad_b


def _decide(*arrays, dtype=jnp.float64):
  arrays = [jnp.asarray(x, dtype) for x in arrays]
  grams = tangent.pair_grams(*arrays, gradient_grams=True)
  inverses = tangent.gram_inverses(grams, **DAMPING)
  return arrays, grams, inverses


@pytest.mark.parametrize("seed", range(4))
def test_backprop_gradients_skip_the_projection(seed):
  rng = np.random.default_rng(seed)
  problem = _pair(rng, 40, 24, 4, consistent=True)
  with jax.enable_x64(True):
    _, grams, inverses = _decide(*problem)
    assert bool(tangent.projection_is_identity(grams, inverses))
  _, grams, inverses = _decide(*problem, dtype=jnp.float32)
  assert bool(tangent.projection_is_identity(grams, inverses))


@pytest.mark.parametrize("case", ["inconsistent", "weight_decay", "b_zero", "deficient_a"])
def test_projection_is_not_skipped_where_it_changes_the_gradients(case):
  rng = np.random.default_rng(3)
  a, b, grad_a, grad_b = _pair(rng, 12, 9, 3, consistent=case != "inconsistent")
  if case == "weight_decay":
    grad_a, grad_b = grad_a + 1e-2 * a, grad_b + 1e-2 * b
  if case == "b_zero":
    b = np.zeros_like(b)
    grad_a = rng.normal(size=grad_a.shape)
  if case == "deficient_a":
    a[:, 2] = a[:, 0]
  with jax.enable_x64(True):
    _, grams, inverses = _decide(a, b, grad_a, grad_b)
    assert not bool(tangent.projection_is_identity(grams, inverses))


@hypothesis.settings(
  max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  d_in=st.integers(2, 16),
  d_out=st.integers(2, 16),
  rank=st.integers(1, 6),
  factor_condition=st.sampled_from([1.0, 10.0, 1e3]),
  noise=st.sampled_from([0.0, 1e-12, 1e-9, 1e-6, 1e-3, 1.0]),
  seed=st.integers(0, 2**16),
)
def test_skip_is_sound(d_in, d_out, rank, factor_condition, noise, seed):
  """Where the test says identity, the projection moves the gradients by ≤ tolerance."""
  hypothesis.assume(rank <= min(d_in, d_out))
  rng = np.random.default_rng(seed)
  a, b, grad_a, grad_b = _pair(
    rng, d_in, d_out, rank, consistent=True, factor_condition=factor_condition
  )
  grad_a = grad_a + noise * rng.normal(size=grad_a.shape)
  grad_b = grad_b + noise * rng.normal(size=grad_b.shape)
  with jax.enable_x64(True):
    arrays, grams, inverses = _decide(a, b, grad_a, grad_b)
    tolerance = 1e-6
    if bool(tangent.projection_is_identity(grams, inverses, tolerance=tolerance)):
      projected = tangent.consistent_gradients(*arrays)
      moved = np.sqrt(
        sum(
          np.sum((np.asarray(x) - y) ** 2) for x, y in zip(projected, (grad_a, grad_b), strict=True)
        )
      )
      size = np.sqrt(np.sum(grad_a**2) + np.sum(grad_b**2))
      assert moved <= tolerance * size * (1 + 1e-6) + 1e-13 * size


def test_conditional_projection_decides_per_group_under_vmap():
  """One inconsistent pair makes the whole group project; else all are kept."""
  rng = np.random.default_rng(5)
  pairs = [_pair(rng, 10, 8, 3, consistent=True) for _ in range(3)]
  with jax.enable_x64(True):

    def run(pairs):
      stacked = [jnp.asarray(np.stack(x)) for x in zip(*pairs, strict=True)]

      def one(a, b, g_a, g_b):
        grams = tangent.pair_grams(a, b, g_a, g_b, gradient_grams=True)
        inverses = tangent.gram_inverses(grams, **DAMPING)
        return tangent.consistent_gradients_unless_identity(a, b, g_a, g_b, grams, inverses)

      return stacked, jax.jit(jax.vmap(one))(*stacked)

    stacked, (got_a, got_b, grams) = run(pairs)
    np.testing.assert_array_equal(np.asarray(got_a), np.asarray(stacked[2]))
    np.testing.assert_array_equal(np.asarray(got_b), np.asarray(stacked[3]))
    a, b, g_a, g_b = pairs[1]
    pairs[1] = (a, b, g_a + rng.normal(size=g_a.shape), g_b)
    stacked, (got_a, got_b, grams) = run(pairs)
    want_a, want_b = jax.vmap(tangent.consistent_gradients)(*stacked)
    np.testing.assert_allclose(np.asarray(got_a), np.asarray(want_a), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got_b), np.asarray(want_b), rtol=0, atol=1e-12)
    # The returned Grams are those of the returned gradients.
    fresh = jax.vmap(tangent.pair_grams)(stacked[0], stacked[1], got_a, got_b)
    np.testing.assert_allclose(np.asarray(grams.cross_a), np.asarray(fresh.cross_a), atol=1e-12)
    np.testing.assert_allclose(np.asarray(grams.cross_b), np.asarray(fresh.cross_b), atol=1e-12)


def test_conditional_projection_without_vmap_matches_the_projection():
  rng = np.random.default_rng(8)
  problem = _pair(rng, 9, 7, 2, consistent=False)
  with jax.enable_x64(True):
    arrays, grams, inverses = _decide(*problem)
    got = tangent.consistent_gradients_unless_identity(*arrays, grams, inverses)[:2]
    want = reference.consistent_projection(*problem)
  for x, y in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(x), y, atol=1e-10)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_conditional_projection_keeps_non_finite_entries_visible(value):
  a, b = jnp.ones((4, 2)).at[0, 1].set(3.0), jnp.ones((2, 3)).at[1, 0].set(2.0)
  grad_a = jnp.zeros((4, 2)).at[1, 0].set(value)
  grams = tangent.pair_grams(a, b, grad_a, jnp.ones((2, 3)))
  inverses = tangent.gram_inverses(grams, **DAMPING)
  projected_a, _, _ = tangent.consistent_gradients_unless_identity(
    a, b, grad_a, jnp.ones((2, 3)), grams, inverses
  )
  assert not np.all(np.isfinite(np.asarray(projected_a)))


@pytest.mark.parametrize("seed", range(3))
def test_factor_step_with_shared_cross_products_is_unchanged(seed):
  rng = np.random.default_rng(seed)
  a, b, grad_a, grad_b = _pair(rng, 11, 6, 3, consistent=False)
  p, q = reference.random_scales(rng, 11, 1e2), reference.random_scales(rng, 6, 1e2)
  with jax.enable_x64(True):
    args = [jnp.asarray(x) for x in (a, b, grad_a, grad_b, p, q)]
    grams = tangent.pair_grams(*args[:4])
    plain = closed_form.factor_step(*args, **DAMPING)
    shared = closed_form.factor_step(*args, **DAMPING, cross=(grams.cross_a, grams.cross_b))
  for x, y in zip(plain, shared, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-14)


def test_consistent_gradients_from_grams_matches_the_dense_projection():
  rng = np.random.default_rng(21)
  problem = _pair(rng, 8, 6, 3, consistent=False)
  with jax.enable_x64(True):
    arrays = [jnp.asarray(x) for x in problem]
    got = tangent.consistent_gradients_from_grams(*arrays, tangent.pair_grams(*arrays))
  for x, y in zip(got, reference.consistent_projection(*problem), strict=True):
    np.testing.assert_allclose(np.asarray(x), y, atol=1e-10)


def test_no_tpu_unsafe_primitives_in_the_shared_kernels():
  forbidden = {"eig", "pure_callback", "io_callback", "callback", "debug_callback"}
  a, b = jnp.ones((6, 2)), jnp.ones((2, 5))

  def update(a, b, g_a, g_b):
    grams = tangent.pair_grams(a, b, g_a, g_b, gradient_grams=True)
    inverses = tangent.gram_inverses(grams, **DAMPING)
    g_a, g_b, grams = tangent.consistent_gradients_unless_identity(a, b, g_a, g_b, grams, inverses)
    return tangent.tangent_statistics_from_grams(a, b, g_a, g_b, grams, inverses)

  text = str(jax.make_jaxpr(jax.vmap(update))(*(jnp.stack([x] * 2) for x in (a, b, a, b))))
  assert not any(f" {name}[" in text or f" {name} " in text for name in forbidden)
