"""The pure pieces of the AdaPreLoRA pair kernel (adaprelora_jax/_src/maths/pair_update.py)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from adaprelora_jax._src.maths import pair_update


def _weighted_rms(delta_w, p, q):
  return np.sqrt(np.sum(np.outer(p, q) * delta_w**2) / (p.sum() * q.sum()))


@pytest.mark.parametrize("size", [0.1, 1.0, 30.0])
def test_clip_bounds_the_weighted_rms_of_delta_w_and_keeps_small_steps(size):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
  delta_a, delta_b = size * rng.normal(size=(6, 2)), size * rng.normal(size=(2, 5))
  p, q = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 5)
  delta_w = delta_a @ b + a @ delta_b
  descent = np.sum(np.outer(p, q) * delta_w**2)  # ‖δW‖²_H
  factor = pair_update.weighted_rms_clip_factor(descent, p, q, 1.0)
  clipped = (delta_a * factor, delta_b * factor)
  clipped_w = np.asarray(clipped[0]) @ b + a @ np.asarray(clipped[1])
  before = _weighted_rms(delta_w, p, q)
  after = _weighted_rms(clipped_w, p, q)
  np.testing.assert_allclose(after, min(before, 1.0), rtol=1e-5)
  if before <= 1.0:
    chex.assert_trees_all_close(clipped, (delta_a, delta_b), rtol=1e-6)


def test_tangent_share_is_exact_for_a_rank_one_g_squared():
  # One token: G = x gᵀ, so G² = x² (g²)ᵀ has rank one and the factored
  # model of G² is exact; the share is then ‖δW‖_H / ‖H⁻¹G‖_H in full.
  rng = np.random.default_rng(1)
  x, g = rng.normal(size=6), rng.normal(size=5)
  grad_w = np.outer(x, g)
  p, q = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 5)
  full = np.sum(grad_w**2 / np.outer(p, q))  # ‖H⁻¹G‖²_H
  descent = 0.3 * full
  share = pair_update.tangent_share(
    jnp.asarray(descent), jnp.mean(grad_w**2, 1), jnp.mean(grad_w**2, 0), p, q
  )
  np.testing.assert_allclose(share, np.sqrt(0.3), rtol=1e-5)


def test_tangent_share_of_a_pair_without_gradient_is_one():
  zeros = jnp.zeros(4)
  share = pair_update.tangent_share(jnp.asarray(0.0), zeros, jnp.zeros(3), jnp.ones(4), jnp.ones(3))
  assert float(share) == 1.0


def test_momentum_is_bias_corrected_from_the_first_step():
  deltas = (jnp.full((3, 2), 2.0), jnp.full((2, 4), -1.0))
  zeros = tuple(jnp.zeros_like(d) for d in deltas)
  momentum, corrected = pair_update.momentum_step(zeros, deltas, 0.9, jnp.asarray(0))
  chex.assert_trees_all_close(corrected, deltas, rtol=1e-6)
  chex.assert_trees_all_close(momentum, tuple(0.1 * d for d in deltas), rtol=1e-6)
  # A constant step stays the bias-corrected step at every count.
  for count in range(1, 5):
    momentum, corrected = pair_update.momentum_step(momentum, deltas, 0.9, jnp.asarray(count))
    chex.assert_trees_all_close(corrected, deltas, rtol=1e-5)


def test_decayed_moment_is_adafactors_ema():
  moment, stats = jnp.array([1.0, 4.0]), jnp.array([3.0, 0.0])
  chex.assert_trees_all_close(pair_update.decayed_moment(moment, stats, 0.0, 1e-3), stats + 1e-3)
  chex.assert_trees_all_close(
    pair_update.decayed_moment(moment, stats, 0.75, 0.0), jnp.array([1.5, 3.0])
  )


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("where", [0, 1])
def test_all_finite_sees_any_non_finite_entry(bad, where):
  arrays = [jnp.ones((3, 2)), jnp.ones((4,), jnp.bfloat16)]
  assert bool(pair_update.all_finite(*arrays))
  arrays[where] = arrays[where].at[1].set(bad)
  assert not bool(pair_update.all_finite(*arrays))


def test_keep_if_finite_selects_whole_trees():
  new, old = {"x": jnp.ones(2), "y": (jnp.full(3, 2.0),)}, {"x": jnp.zeros(2), "y": (jnp.zeros(3),)}
  chex.assert_trees_all_close(pair_update.keep_if_finite(jnp.array(True), new, old), new)
  chex.assert_trees_all_close(pair_update.keep_if_finite(jnp.array(False), new, old), old)
