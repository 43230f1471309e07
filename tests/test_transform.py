"""scale_by_adaprelora / adaprelora: maths vs reference, optax integration."""

import re
import zlib

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaprelora_jax as ap
from adaprelora_jax._src.discovery import plan as plan_lib
from tests import reference

NEAR_EXACT = dict(damping=1e-13, damping_floor=1e-15)


def _pair(seed, d_in, d_out, rank, *, b_scale=1.0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d_in, rank))
  b = rng.normal(size=(rank, d_out)) * b_scale
  return a, b


def _grads_from_weight_gradient(params, weight_grads, stats=False):
  """Factor gradients (and optionally exact statistics) from dense G's."""
  grads = {}
  for name, pair in params.items():
    a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
    grad_w = weight_grads[name]
    grads[name] = {"lora_a": grad_w @ b.T, "lora_b": a.T @ grad_w}
    if stats:
      grads[name]["grad_sq_rows"] = np.mean(grad_w**2, axis=1)
      grads[name]["grad_sq_cols"] = np.mean(grad_w**2, axis=0)
  return jax.tree.map(jnp.asarray, grads)


def _add_stat_leaves(params):
  return {
    name: {
      **pair,
      "grad_sq_rows": jnp.zeros(pair["lora_a"].shape[0]),
      "grad_sq_cols": jnp.zeros(pair["lora_b"].shape[1]),
    }
    for name, pair in params.items()
  }


def _moments(state, params, name=None):
  """A pair's (row, column) second moments as numpy arrays."""
  rows, cols = ap.second_moments(state, params)
  if name is not None:
    rows, cols = rows[name], cols[name]
  return np.asarray(rows["lora_a"]), np.asarray(cols["lora_b"])


@pytest.mark.parametrize("statistics", ["exact", "tangent", "surrogate"])
def test_three_steps_match_the_reference(statistics):
  """Multi-pair, mixed shapes (several groups), statistics EMA and clipping."""
  shapes = {"q": (7, 6, 2), "k": (7, 6, 2), "ffn": (5, 9, 3)}
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {
      name: dict(zip(("lora_a", "lora_b"), map(jnp.asarray, _pair(i, *shape)), strict=True))
      for i, (name, shape) in enumerate(shapes.items())
    }
    if statistics == "exact":
      params = _add_stat_leaves(params)
    tx = ap.scale_by_adaprelora(statistics=statistics, **NEAR_EXACT)
    state = tx.init(params)
    update = jax.jit(tx.update)
    moments = {name: (np.zeros(s[0]), np.zeros(s[1])) for name, s in shapes.items()}
    for step in range(3):
      weight_grads = {
        name: rng.normal(size=shape[:2]) * (1 + 5 * step) for name, shape in shapes.items()
      }
      grads = _grads_from_weight_gradient(params, weight_grads, stats=statistics == "exact")
      updates, state = update(grads, state, params)
      for name in shapes:
        a, b = (np.asarray(params[name][k]) for k in ("lora_a", "lora_b"))
        delta_a, delta_b, row, col = reference.adaprelora_step(
          a, b, weight_grads[name], *moments[name], step, statistics=statistics
        )
        moments[name] = (row, col)
        got_row, got_col = _moments(state, params, name)
        np.testing.assert_allclose(got_row, row, rtol=1e-6)
        np.testing.assert_allclose(got_col, col, rtol=1e-6)
        got_a, got_b = np.asarray(updates[name]["lora_a"]), np.asarray(updates[name]["lora_b"])
        expected_w = delta_a @ b + a @ delta_b
        error_w = np.linalg.norm(got_a @ b + a @ got_b - expected_w)
        assert error_w < 1e-7 * np.linalg.norm(expected_w)
        scale = np.linalg.norm(delta_a) + np.linalg.norm(delta_b)
        assert np.linalg.norm(got_a - delta_a) + np.linalg.norm(got_b - delta_b) < 1e-3 * scale
        if statistics == "exact":
          assert np.all(np.asarray(updates[name]["grad_sq_rows"]) == 0.0)
      # Move the params so the next step sees new factors.
      params = jax.tree.map(lambda p, u: p - 0.01 * u, params, updates)


def test_first_step_statistics_and_decay_schedule():
  with jax.enable_x64(True):
    params = _add_stat_leaves(
      {"w": dict(zip(("lora_a", "lora_b"), map(jnp.asarray, _pair(1, 4, 3, 2)), strict=True))}
    )
    tx = ap.scale_by_adaprelora(eps=1e-3)
    state = tx.init(params)
    first = np.arange(1.0, 13.0).reshape(4, 3)
    second = np.ones((4, 3)) * 2.0
    _, state = tx.update(_grads_from_weight_gradient(params, {"w": first}, True), state, params)
    # β2 = 0 on the first step: the statistics are the first gradient's.
    np.testing.assert_allclose(_moments(state, params, "w")[0], np.mean(first**2, axis=1) + 1e-3)
    _, state = tx.update(_grads_from_weight_gradient(params, {"w": second}, True), state, params)
    beta2 = 1.0 - 2.0**-0.8
    np.testing.assert_allclose(
      _moments(state, params, "w")[1],
      beta2 * (np.mean(first**2, axis=0) + 1e-3) + (1 - beta2) * (4.0 + 1e-3),
    )
    assert int(state.count) == 2


def test_clipping_bounds_the_h_rms_of_the_weight_update():
  with jax.enable_x64(True):
    params = {
      "w": dict(zip(("lora_a", "lora_b"), map(jnp.asarray, _pair(2, 12, 10, 4)), strict=True))
    }
    rng = np.random.default_rng(2)
    g_small = rng.normal(size=(12, 10)) * 1e-3
    g_large = rng.normal(size=(12, 10)) * 1e3  # stale statistics: huge step
    for threshold in (None, 1.0, 0.1):
      tx = ap.scale_by_adaprelora(clipping_threshold=threshold, **NEAR_EXACT)
      state = tx.init(params)
      small_grads = _grads_from_weight_gradient(params, {"w": g_small})
      update = jax.jit(tx.update)
      # After 200 steps β2 ≈ 0.986: the statistics lag the sudden large gradient.
      for _ in range(200):
        _, state = update(small_grads, state, params)
      updates, state = tx.update(_grads_from_weight_gradient(params, {"w": g_large}), state, params)
      a, b = np.asarray(params["w"]["lora_a"]), np.asarray(params["w"]["lora_b"])
      delta_w = np.asarray(updates["w"]["lora_a"]) @ b + a @ np.asarray(updates["w"]["lora_b"])
      p, q = reference.adafactor_scales(*_moments(state, params, "w"))
      rms = np.sqrt(reference.h_norm_sq(delta_w, p, q) / (p.sum() * q.sum()))
      if threshold is None:
        assert rms > 3.0
      else:
        np.testing.assert_allclose(rms, threshold, rtol=1e-6)


def test_momentum_is_a_bias_corrected_ema_of_clipped_updates():
  params = {"w": dict(zip(("lora_a", "lora_b"), map(jnp.asarray, _pair(3, 6, 5, 2)), strict=True))}
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  rng = np.random.default_rng(3)
  plain, with_momentum = ap.scale_by_adaprelora(), ap.scale_by_adaprelora(b1=0.8)
  state_plain, state_m = plain.init(params), with_momentum.init(params)
  ema = jax.tree.map(jnp.zeros_like, params)
  for step in range(4):
    grads = _grads_from_weight_gradient(params, {"w": rng.normal(size=(6, 5))})
    grads = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
    raw, state_plain = plain.update(grads, state_plain, params)
    got, state_m = with_momentum.update(grads, state_m, params)
    ema = jax.tree.map(lambda m, u: 0.8 * m + 0.2 * u, ema, raw)
    expected = optax.tree.bias_correction(ema, 0.8, step + 1)
    chex_close(got, expected, rtol=1e-5)
  assert state_m.pairs.momentum["w"]["lora_a"].shape == (6, 2)
  assert state_plain.pairs.momentum is None


def chex_close(x, y, rtol):
  """``x`` and ``y`` have one tree structure and shapes, and close leaves."""
  chex.assert_trees_all_close(x, y, rtol=rtol, atol=1e-7)


def test_stacked_layers_equal_per_layer_pairs():
  rng = np.random.default_rng(4)
  layers = 3
  a = rng.normal(size=(layers, 8, 2)).astype(np.float32)
  b = rng.normal(size=(layers, 2, 5)).astype(np.float32)
  g = rng.normal(size=(layers, 8, 5)).astype(np.float32)
  stacked = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
  stacked_grads = {
    "lora_a": jnp.einsum("lij,lkj->lik", g, b),
    "lora_b": jnp.einsum("lia,lij->laj", a, g),
  }
  split = {
    f"layer{i}": {"lora_a": stacked["lora_a"][i], "lora_b": stacked["lora_b"][i]}
    for i in range(layers)
  }
  split_grads = {
    f"layer{i}": {"lora_a": stacked_grads["lora_a"][i], "lora_b": stacked_grads["lora_b"][i]}
    for i in range(layers)
  }
  tx = ap.scale_by_adaprelora()
  u_stacked, s_stacked = tx.update(stacked_grads, tx.init(stacked), stacked)
  u_split, s_split = tx.update(split_grads, tx.init(split), split)
  for i in range(layers):
    for role in ("lora_a", "lora_b"):
      np.testing.assert_allclose(
        np.asarray(u_stacked[role][i]), np.asarray(u_split[f"layer{i}"][role]), rtol=2e-5, atol=1e-7
      )
  assert ap.second_moments(s_stacked, stacked)[0]["lora_a"].shape == (layers, 8)
  for i in range(layers):
    for got, want in zip(
      _moments(s_split, split, f"layer{i}"), _moments(s_stacked, stacked), strict=True
    ):
      np.testing.assert_allclose(got, want[i], rtol=1e-6)
  assert s_stacked.pairs.nonfinite_count.shape == s_split.pairs.nonfinite_count.shape == (layers,)


def test_peft_layout_equals_flax_layout():
  a, b = _pair(5, 7, 4, 3)
  rng = np.random.default_rng(5)
  g = rng.normal(size=(7, 4))
  flax_params = {
    "layer": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
  }
  flax_grads = {
    "layer": {
      "lora_a": jnp.asarray(g @ b.T, jnp.float32),
      "lora_b": jnp.asarray(a.T @ g, jnp.float32),
    }
  }
  peft_params = {
    "base.layer.lora_A.default.weight": flax_params["layer"]["lora_a"].T,
    "base.layer.lora_B.default.weight": flax_params["layer"]["lora_b"].T,
  }
  peft_grads = {
    "base.layer.lora_A.default.weight": flax_grads["layer"]["lora_a"].T,
    "base.layer.lora_B.default.weight": flax_grads["layer"]["lora_b"].T,
  }
  flax_tx, peft_tx = ap.adaprelora(0.1, b1=0.9), ap.adaprelora(0.1, b1=0.9, pairing="peft")
  u_flax, s_flax = flax_tx.update(flax_grads, flax_tx.init(flax_params), flax_params)
  u_peft, s_peft = peft_tx.update(peft_grads, peft_tx.init(peft_params), peft_params)
  np.testing.assert_allclose(
    np.asarray(u_peft["base.layer.lora_A.default.weight"]),
    np.asarray(u_flax["layer"]["lora_a"]).T,
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(u_peft["base.layer.lora_B.default.weight"]),
    np.asarray(u_flax["layer"]["lora_b"]).T,
    rtol=1e-6,
  )
  # Momentum is stored in each leaf's own layout.
  momentum = optax.tree_utils.tree_get(s_peft, "momentum")
  assert momentum["base.layer.lora_A.default.weight"].shape == (3, 7)


def test_the_alias_routes_non_lora_leaves_by_partition_and_the_core_refuses_them():
  params = {
    "adapter": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))},
    "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
  }
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  tx = ap.adaprelora(1.0)
  updates, state = tx.update(grads, tx.init(params), params)
  adam = optax.scale_by_adam()
  expected, _ = adam.update(grads["head"], adam.init(params["head"]))
  chex_close(updates["head"], jax.tree.map(lambda u: -u, expected), rtol=1e-6)
  # The same as an optax.partition of one's own over ap.lora_labels().
  own = optax.chain(
    optax.partition(
      {"lora": ap.scale_by_adaprelora(), "non_lora": optax.scale_by_adam()}, ap.lora_labels()
    ),
    optax.scale_by_learning_rate(1.0),
  )
  own_updates, _ = own.update(grads, own.init(params), params)
  chex_close(updates, own_updates, rtol=1e-6)
  custom = ap.adaprelora(1.0, non_lora=optax.scale(-2.0))
  updates, _ = custom.update(grads, custom.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["head"]["bias"]), 0.6, rtol=1e-6)
  with pytest.raises(
    ValueError, match="strict=True.*not LoRA factors.*'head/bias'|'head/bias'.*not LoRA factors"
  ):
    ap.adaprelora(1.0, strict=True).init(params)
  # The core owns the LoRA factors only: it names the leaves it was given
  # beyond them, and the ways to route them.
  for stage in ("init", "update"):
    core = ap.scale_by_adaprelora()
    with pytest.raises(ValueError, match=r"LoRA factors only.*'head/bias'.*lora_labels"):
      if stage == "init":
        core.init(params)
      else:
        core.update(grads, core.init(params["adapter"]), params)


def test_nonfinite_gradients_skip_only_that_pair():
  params = {
    "good": {"lora_a": jnp.ones((4, 2)) * 0.5, "lora_b": jnp.ones((2, 3)) * 0.1},
    "bad": {"lora_a": jnp.ones((4, 2)) * 0.5, "lora_b": jnp.ones((2, 3)) * 0.1},
  }
  rng = np.random.default_rng(6)
  g = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  grads = {
    name: {"lora_a": g @ p["lora_b"].T, "lora_b": p["lora_a"].T @ g} for name, p in params.items()
  }
  tx = ap.adaprelora(0.1)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  before = state[0]
  # New gradients (an EMA of a repeated gradient would not change).
  grads = jax.tree.map(lambda g: 2.0 * g, grads)
  grads["bad"]["lora_b"] = grads["bad"]["lora_b"].at[0, 1].set(jnp.inf)
  updates, state = jax.jit(tx.update)(grads, state, params)
  after = state[0]
  assert np.all(np.asarray(updates["bad"]["lora_a"]) == 0.0)
  assert np.all(np.asarray(updates["bad"]["lora_b"]) == 0.0)
  assert np.all(np.isfinite(np.asarray(updates["good"]["lora_a"])))
  assert np.any(np.asarray(updates["good"]["lora_a"]) != 0.0)
  np.testing.assert_array_equal(
    _moments(after, params, "bad")[0], _moments(before, params, "bad")[0]
  )
  assert not np.array_equal(_moments(after, params, "good")[0], _moments(before, params, "good")[0])
  assert ap.nonfinite_report(state, params) == {"bad/lora_a": 1}
  grads["bad"]["lora_a"] = grads["bad"]["lora_a"] * jnp.nan
  _, state = tx.update(grads, state, params)
  assert ap.nonfinite_report(state, params) == {"bad/lora_a": 2}


@pytest.mark.parametrize("b_scale", [0.0, 0.3])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["lora_a", "lora_b", "grad_sq_rows", "grad_sq_cols"])
def test_any_nonfinite_input_skips_the_pair(where, value, b_scale):
  """One non-finite entry anywhere in a pair's inputs skips that pair.

  The skip test looks at the factor step and exact statistics, not the
  gradients; this checks that every input gives a skip, including at LoRA
  init (b = 0): tangent statistics when a gradient is hit, exact statistics
  (probe leaves on both pairs) when a statistic is.
  """
  # A seed per case (str hashes change from run to run; crc32 does not).
  rng = np.random.default_rng(zlib.crc32(f"{where} {value} {b_scale}".encode()))
  params = {
    name: {
      "lora_a": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
      "lora_b": jnp.asarray(rng.normal(size=(2, 5)) * b_scale, jnp.float32),
    }
    for name in ("good", "bad")
  }
  weight_grads = {name: rng.normal(size=(6, 5)) for name in params}
  exact = where.startswith("grad_sq")
  params = _add_stat_leaves(params) if exact else params
  grads = _grads_from_weight_gradient(
    {
      name: {k: v for k, v in pair.items() if k.startswith("lora")} for name, pair in params.items()
    },
    weight_grads,
    stats=exact,
  )
  tx = ap.adaprelora(0.1)
  _, state = tx.update(grads, tx.init(params), params)
  leaf = np.array(grads["bad"][where])
  leaf[tuple(rng.integers(0, size) for size in leaf.shape)] = value
  grads["bad"][where] = jnp.asarray(leaf)
  updates, new_state = tx.update(grads, state, params)
  for role in ("lora_a", "lora_b"):
    assert np.all(np.asarray(updates["bad"][role]) == 0.0)
    assert np.all(np.isfinite(np.asarray(updates["good"][role])))
  for got, want in zip(
    _moments(new_state, params, "bad"), _moments(state, params, "bad"), strict=True
  ):
    np.testing.assert_array_equal(got, want)
  assert ap.nonfinite_report(new_state, params) == {"bad/lora_a": 1}


def test_nonfinite_report_rejects_other_params():
  params = {"p": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
  state = ap.scale_by_adaprelora().init(params)
  other = {**params, "q": {"lora_a": jnp.ones((5, 2)), "lora_b": jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match=r"nonfinite_count has shape \(1,\).*2 LoRA pairs"):
    ap.nonfinite_report(state, other)


def test_second_moments_are_stacked_per_group_and_read_back_per_pair():
  def pair(d_in, scale):
    return {"lora_a": jnp.full((d_in, 2), scale), "lora_b": jnp.ones((2, 3))}

  params = {"q": pair(4, 1.0), "k": pair(4, 2.0), "o": pair(5, 1.0)}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  tx = ap.adaprelora(1e-2)
  _, state = tx.update(grads, tx.init(params), params)
  # Two groups: (q, k) stacked in plan order, and o.
  row_second_moment = optax.tree_utils.tree_get(state, "row_second_moment")
  assert [array.shape for array in row_second_moment] == [(2, 4), (1, 5)]
  rows, cols = ap.second_moments(state, params)
  groups = ap.plan_pairs(params).groups
  col_second_moment = optax.tree_utils.tree_get(state, "col_second_moment")
  for stacked, group in zip(col_second_moment, groups, strict=True):
    for position, member in enumerate(group.members):
      np.testing.assert_array_equal(
        np.asarray(cols[member.name]["lora_b"]), np.asarray(stacked[position])
      )
  # k's gradients are twice q's: its statistics differ, so a swap would show.
  assert not np.allclose(np.asarray(rows["q"]["lora_a"]), np.asarray(rows["k"]["lora_a"]))
  assert isinstance(rows["q"]["lora_b"], optax.MaskedNode)
  other = {**params, "o": pair(6, 1.0)}
  with pytest.raises(ValueError, match="pass the params"):
    ap.second_moments(state, other)
  with pytest.raises(ValueError, match="2 ScaleByAdaPreLoRAStates"):
    ap.second_moments((state, state), params)
  with pytest.raises(ValueError, match="No ScaleByAdaPreLoRAState"):
    ap.second_moments(optax.adam(1e-3).init(params), params)


def test_a_state_for_other_groups_is_rejected_by_update():
  params = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
  other = {**params, "o": {"lora_a": jnp.ones((5, 2)), "lora_b": jnp.ones((2, 3))}}
  tx = ap.scale_by_adaprelora()
  state = tx.init(params)
  with pytest.raises(ValueError, match="'row_second_moment' should hold one array per group"):
    tx.update(other, state._replace(bookkeeping=tx.init(other).bookkeeping), other)


def test_nonfinite_propagate_policy_lets_nans_through():
  params = {"p": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
  grads = {"p": {"lora_a": jnp.full((4, 2), jnp.nan), "lora_b": jnp.ones((2, 3))}}
  tx = ap.scale_by_adaprelora(nonfinite="propagate")
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.isnan(np.asarray(updates["p"]["lora_a"])).any()


def test_bfloat16_params_keep_float32_state():
  params = {
    "p": {"lora_a": jnp.ones((8, 4), jnp.bfloat16) * 0.3, "lora_b": jnp.zeros((4, 6), jnp.bfloat16)}
  }
  rng = np.random.default_rng(7)
  tx = ap.adaprelora(1e-2, b1=0.9)
  state = tx.init(params)
  for _ in range(5):
    g = jnp.asarray(rng.normal(size=(8, 6)), jnp.bfloat16)
    grads = {"p": {"lora_a": g @ params["p"]["lora_b"].T, "lora_b": params["p"]["lora_a"].T @ g}}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert params["p"]["lora_a"].dtype == jnp.bfloat16
  assert updates["p"]["lora_b"].dtype == jnp.bfloat16
  moments = [optax.tree_utils.tree_get(state, f"{axis}_second_moment") for axis in ("row", "col")]
  assert all(array.dtype == jnp.float32 for array in jax.tree.leaves(moments))
  assert optax.tree_utils.tree_get(state, "momentum")["p"]["lora_b"].dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(params["p"]["lora_b"], np.float32)))
  assert np.any(np.asarray(params["p"]["lora_a"], np.float32) != 0.3)


def _quadratic_problem(seed=0, d_in=10, d_out=8, rank=2):
  rng = np.random.default_rng(seed)
  target = jnp.asarray(rng.normal(size=(d_in, rank)) @ rng.normal(size=(rank, d_out)), jnp.float32)
  params = {
    "layer": {
      "lora_a": jnp.asarray(rng.normal(size=(d_in, rank)), jnp.float32) * 0.3,
      "lora_b": jnp.zeros((rank, d_out), jnp.float32),
    }
  }

  def loss(p):
    return jnp.mean((p["layer"]["lora_a"] @ p["layer"]["lora_b"] - target) ** 2)

  return params, loss


def _train(tx, steps=40, seed=0):
  params, loss = _quadratic_problem(seed)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  losses = [float(loss(params))]
  for _ in range(steps):
    params, state = step(params, state)
    losses.append(float(loss(params)))
  return losses, params, state


def test_inject_hyperparams_changes_the_learning_rate_mid_run():
  tx = optax.inject_hyperparams(ap.adaprelora)(learning_rate=0.05)
  params, loss = _quadratic_problem()
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  full, state = tx.update(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.005)
  reduced, _ = tx.update(grads, state, params)
  reference_tx = ap.adaprelora(0.05)
  s = reference_tx.init(params)
  first, s = reference_tx.update(grads, s, params)
  second, _ = reference_tx.update(grads, s, params)
  chex_close(full, first, rtol=1e-6)
  chex_close(reduced, jax.tree.map(lambda u: u * 0.1, second), rtol=1e-5)


def test_inject_hyperparams_accepts_every_numeric_hyperparameter():
  tx = optax.inject_hyperparams(ap.adaprelora)(
    learning_rate=0.05,
    decay_rate=0.8,
    damping=1e-4,
    damping_floor=1e-8,
    clipping_threshold=1.0,
    b1=0.9,
    weight_decay=1e-3,
  )
  losses, _, _ = _train(tx, steps=10)
  assert losses[-1] < losses[0]


def test_schedules_set_the_step_size():
  schedule = optax.linear_schedule(0.1, 0.0, 4)
  tx = ap.adaprelora(schedule)
  constant = ap.scale_by_adaprelora()
  params, loss = _quadratic_problem()
  grads = jax.grad(loss)(params)
  s, c = tx.init(params), constant.init(params)
  for step in range(4):
    updates, s = tx.update(grads, s, params)
    raw, c = constant.update(grads, c, params)
    chex_close(updates, optax.tree.scale(-schedule(step), raw), rtol=1e-6)


def test_weight_decay_is_decoupled_and_masked():
  params, loss = _quadratic_problem()
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = ap.adaprelora(0.1, weight_decay=0.5)
  updates, _ = tx.update(grads, tx.init(params), params)
  chex_close(updates, jax.tree.map(lambda p: -0.1 * 0.5 * p, params), rtol=1e-6)
  mask = {"layer": {"lora_a": False, "lora_b": True}}
  tx = ap.adaprelora(0.1, weight_decay=0.5, mask=mask)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(updates["layer"]["lora_a"]) == 0.0)


def test_chain_and_masked_compose():
  params, loss = _quadratic_problem()
  params["frozen"] = {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))}

  def full_loss(p):
    return loss(p) + jnp.sum(p["frozen"]["lora_a"] @ p["frozen"]["lora_b"])

  mask = {"layer": {"lora_a": True, "lora_b": True}, "frozen": {"lora_a": False, "lora_b": False}}
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.masked(ap.adaprelora(0.05), mask),
    optax.masked(
      optax.set_to_zero(),
      {"layer": {"lora_a": False, "lora_b": False}, "frozen": {"lora_a": True, "lora_b": True}},
    ),
  )
  state = tx.init(params)
  for _ in range(20):
    updates, state = tx.update(jax.grad(full_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert np.all(np.asarray(params["frozen"]["lora_a"]) == 1.0)
  assert float(loss(params)) < 0.5 * float(_quadratic_problem()[1](_quadratic_problem()[0]))


def test_masking_half_a_pair_is_a_clear_error():
  params, _ = _quadratic_problem()
  mask = {"layer": {"lora_a": True, "lora_b": False}}
  tx = optax.masked(ap.adaprelora(0.1), mask)
  with pytest.raises(ValueError, match="Unpaired LoRA factor 'layer/lora_a'"):
    tx.init(params)


def test_optimizer_reduces_loss_and_beats_its_first_steps():
  losses, _, _ = _train(ap.adaprelora(0.05), steps=60)
  assert losses[-1] < 0.1 * losses[0]


def test_update_without_params_is_an_error():
  params, loss = _quadratic_problem()
  tx = ap.adaprelora(0.1)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(jax.grad(loss)(params), tx.init(params))


def test_gradient_shape_mismatch_names_the_path():
  params, loss = _quadratic_problem()
  tx = ap.scale_by_adaprelora()
  grads = jax.grad(loss)(params)
  grads["layer"]["lora_b"] = jnp.zeros((3, 8))
  with pytest.raises(ValueError, match="'layer/lora_b' has shape"):
    tx.update(grads, tx.init(params), params)
  grads["layer"]["lora_b"] = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="'layer/lora_b'.*floating"):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(tie_breaker="middle"), "tie_breaker"),
    (dict(nonfinite="raise"), "nonfinite"),
    (dict(statistics="full"), "statistics"),
    (dict(damping_floor=0.0), "damping_floor"),
    (dict(damping=-1.0), "damping"),
    (dict(pairing="torch"), "pairing preset"),
  ],
)
def test_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ap.scale_by_adaprelora(**kwargs)


def test_statistics_exact_requires_statistics_leaves():
  params, _ = _quadratic_problem()
  with pytest.raises(ValueError, match="statistics='exact'.*'layer'"):
    ap.scale_by_adaprelora(statistics="exact").init(params)


def test_same_shaped_pairs_share_one_group():
  params = {
    f"layer{i}": {"lora_a": jnp.ones((16, 4)), "lora_b": jnp.ones((4, 8))} for i in range(12)
  }
  plan = plan_lib.plan_pairs(params)
  assert len(plan.groups) == 1 and plan.groups[0].size == 12
  tx = ap.scale_by_adaprelora()
  grads = jax.tree.map(jnp.ones_like, params)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(grads, tx.init(params), params)
  # One vmapped Cholesky pair per group (S_a, S_b and the two tangent Grams),
  # not one per layer.
  count = sum(eq.primitive.name == "cholesky" for eq in _all_equations(jaxpr.jaxpr))
  assert count == 4


def _per_layer_tree(layers):
  shapes = {"attn": (16, 16), "up": (16, 24), "down": (24, 16)}
  rng = np.random.default_rng(layers)
  params = {
    f"layer{i}/{name}": {
      "lora_a": jnp.asarray(rng.normal(size=(d_in, 4)), jnp.float32),
      "lora_b": jnp.asarray(rng.normal(size=(4, d_out)), jnp.float32),
    }
    for i in range(layers)
    for name, (d_in, d_out) in shapes.items()
  }
  return params, jax.tree.map(lambda x: 0.1 * x, params)


def _distinct_fused_kernels(hlo_text):
  """Fused computations of an optimized HLO module, up to instruction names."""
  bodies = set()
  for computation in hlo_text.split("\n\n"):
    if "fused_computation" in computation.split("\n", 1)[0]:
      body = computation.split("\n", 1)[1]
      body = re.sub(r", metadata=\{[^}]*\}", "", body)
      bodies.add(re.sub(r"%[\w.\-]+", "%x", body))
  return len(bodies)


def test_compiled_step_has_as_many_distinct_kernels_for_any_number_of_layers():
  # XLA compiles each distinct fused kernel separately; members are cut out
  # of the group results at positions read from the state, so adding layers
  # must reuse kernels, not add one static-offset slice kernel per layer.
  tx = ap.adaprelora(1e-2)
  counts = []
  for layers in (2, 5):
    params, grads = _per_layer_tree(layers)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    counts.append(
      _distinct_fused_kernels(step.lower(grads, tx.init(params), params).compile().as_text())
    )
  # None found would mean the HLO text is no longer parsed, not reuse.
  assert counts[0] > 0, counts
  assert counts[0] == counts[1], counts


def test_pair_position_records_each_pairs_place_in_its_group():
  params, grads = _per_layer_tree(3)
  positions = ap.scale_by_adaprelora().init(params).bookkeeping.pair_position
  assert positions["layer2/up"]["lora_a"] == 2
  assert positions["layer0/down"]["lora_a"] == 0
  assert positions["layer1/attn"]["lora_b"] == optax.MaskedNode()
  # Stacked layers: one position per pair of the stack.
  stacked = {"lora_a": jnp.ones((3, 8, 2)), "lora_b": jnp.ones((3, 2, 5))}
  stacked_state = ap.scale_by_adaprelora().init(stacked)
  assert stacked_state.bookkeeping.pair_position["lora_a"].shape == (3,)


def test_edited_pair_positions_give_nan_updates_not_swapped_ones():
  params, grads = _per_layer_tree(3)
  tx = ap.scale_by_adaprelora()
  state = tx.init(params)
  good, _ = jax.jit(tx.update)(grads, state, params)
  edited = state._replace(
    bookkeeping=state.bookkeeping._replace(
      pair_position=jax.tree.map(jnp.zeros_like, state.bookkeeping.pair_position)
    )
  )
  bad, _ = jax.jit(tx.update)(grads, edited, params)
  assert np.isfinite(np.asarray(good["layer1/up"]["lora_a"])).all()
  # Every update of a group with an edited position is NaN, so the edit
  # cannot pass unnoticed as another pair's step.
  for name in ("layer0/up", "layer1/up", "layer2/attn"):
    for role in ("lora_a", "lora_b"):
      assert np.isnan(np.asarray(bad[name][role])).all(), (name, role)


def _all_equations(jaxpr):
  for equation in jaxpr.eqns:
    yield equation
    for value in equation.params.values():
      inner = getattr(value, "jaxpr", None)
      if inner is not None:
        yield from _all_equations(getattr(inner, "jaxpr", inner))


@hypothesis.settings(
  max_examples=30, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  d_in=st.sampled_from([1, 6, 31]),
  d_out=st.sampled_from([2, 9]),
  rank=st.sampled_from([1, 4, 16]),
  b_scale=st.sampled_from([0.0, 1e-12, 1e-4, 1.0]),
  grad_scale=st.sampled_from([0.0, 1e-30, 1.0, 1e8]),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  statistics=st.sampled_from(["tangent", "exact"]),
  seed=st.integers(0, 1000),
)
def test_fuzz_transform_outputs_are_finite(
  d_in, d_out, rank, b_scale, grad_scale, dtype, statistics, seed
):
  rng = np.random.default_rng(seed)
  a, b = _pair(seed, d_in, d_out, rank, b_scale=b_scale)
  g = rng.normal(size=(d_in, d_out)) * grad_scale
  params = {"p": {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}}
  grads = {"p": {"lora_a": jnp.asarray(g @ b.T, dtype), "lora_b": jnp.asarray(a.T @ g, dtype)}}
  if statistics == "exact":
    params = _add_stat_leaves(params)
    grads["p"]["grad_sq_rows"] = jnp.asarray(np.mean(g**2, axis=1), jnp.float32)
    grads["p"]["grad_sq_cols"] = jnp.asarray(np.mean(g**2, axis=0), jnp.float32)
  tx = ap.adaprelora(1e-2, b1=0.9)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    for leaf in jax.tree.leaves(updates):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  assert ap.nonfinite_report(state, params) == {}


def test_dead_input_feature_with_large_gradients_stays_finite():
  """A zero row of G makes eps/mean(v_row) underflow float32 when |G| is large;
  the row scale must not become 0 (0/0 in g_a / p)."""
  rng = np.random.default_rng(8)
  a, b = _pair(8, 6, 4, 2)
  g = rng.normal(size=(6, 4)) * 1e8
  g[2] = 0.0
  params = _add_stat_leaves(
    {"p": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}
  )
  grads = jax.tree.map(
    lambda x: jnp.asarray(x, jnp.float32), _grads_from_weight_gradient(params, {"p": g}, stats=True)
  )
  tx = ap.scale_by_adaprelora()
  updates, state = tx.update(grads, tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["p"]["lora_a"])))
  assert np.any(np.asarray(updates["p"]["lora_b"]) != 0.0)
  assert ap.nonfinite_report(state, params) == {}


def test_inconsistent_factor_gradients_give_a_bounded_step():
  """Gradients that are not ``(G bᵀ, aᵀ G)`` of one G, as a per-leaf transform
  earlier in a chain would give: the tangent statistics stay positive, so the
  step stays of the order of the learning rate (it was ~1e7 before)."""
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "lora_a": jax.random.normal(keys[0], (256, 4)),
    "lora_b": 0.1 * jax.random.normal(keys[1], (4, 192)),
  }
  grads = {
    "lora_a": jax.random.normal(keys[2], (256, 4)),
    "lora_b": 0.1 * jax.random.normal(keys[3], (4, 192)),
  }
  tx = ap.adaprelora(1e-2)
  jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  eager, _ = tx.update(grads, tx.init(params), params)
  for name in ("lora_a", "lora_b"):
    assert float(jnp.max(jnp.abs(jitted[name]))) < 1.0
    np.testing.assert_allclose(
      np.asarray(jitted[name]), np.asarray(eager[name]), rtol=1e-3, atol=1e-6
    )


def _weight_decay_probe(weight_decay):
  """The issue's probe: weight decay chained before the preconditioner, b ~ 1e-6."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(32, 4)), 1e-6 * rng.normal(size=(4, 24))
  grad_w = rng.normal(size=(32, 24))
  params = {"l": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}
  grads = {
    "l": {
      "lora_a": jnp.asarray(grad_w @ b.T, jnp.float32),
      "lora_b": jnp.asarray(a.T @ grad_w, jnp.float32),
    }
  }
  tx = optax.chain(
    optax.add_decayed_weights(weight_decay), ap.scale_by_adaprelora(), optax.scale(-1e-2)
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates["l"]


def test_weight_decay_chained_before_the_preconditioner_moves_no_factor():
  """Regression: the decay's gauge component was amplified by S_b⁻¹ (max |update| 917)."""
  decayed, plain = _weight_decay_probe(1e-2), _weight_decay_probe(0.0)
  for name in ("lora_a", "lora_b"):
    scale = float(jnp.max(jnp.abs(plain[name])))
    np.testing.assert_allclose(
      np.asarray(decayed[name]), np.asarray(plain[name]), rtol=1e-3, atol=1e-3 * scale
    )


def _minimum_norm_weight_gradient(a, b, grad_a, grad_b):
  """A G with (G bᵀ, aᵀ G) = the consistent projection of (g_a, g_b)."""
  projected = reference.consistent_projection(a, b, grad_a, grad_b)
  adjoint = reference.lora_jacobian(a, b).T
  flat = np.concatenate([x.ravel() for x in projected])
  solution, *_ = np.linalg.lstsq(adjoint, flat, rcond=None)
  return solution.reshape(a.shape[0], b.shape[1])


@hypothesis.settings(
  max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  shape=st.sampled_from([(6, 5, 2), (9, 4, 3), (5, 8, 4), (7, 7, 1)]),
  a_scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e2]),
  b_scale=st.sampled_from([0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0]),
  deficient=st.sampled_from(["none", "a", "b"]),
  consistent_scale=st.sampled_from([0.0, 1.0, 1e3]),
  inconsistent_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
  seed=st.integers(0, 2**16),
)
def test_fuzz_any_factor_gradients_give_a_bounded_step(
  shape, a_scale, b_scale, deficient, consistent_scale, inconsistent_scale, seed
):
  """For any finite factor gradients, ‖diag(p)^½ δa‖_F ≤ ‖H⁻¹G̃‖_H / (2√f_b).

  G̃ is any weight gradient with the projected factor gradients; f_b ≥
  damping_floor · mean(q) is the damping of S_b (likewise for δb with f_a),
  docs/design.md §4. Gradients mix those of one G with arbitrary ones, b
  runs down to 0, and a factor may be rank-deficient.
  """
  rng = np.random.default_rng(seed)
  d_in, d_out, rank = shape
  a = a_scale * rng.normal(size=(d_in, rank))
  b = b_scale * rng.normal(size=(rank, d_out))
  if deficient == "a" and rank > 1:
    a[:, -1] = a[:, 0]
  if deficient == "b" and rank > 1:
    b[-1] = 2.0 * b[0]
  grad_w = consistent_scale * rng.normal(size=(d_in, d_out))
  grad_a = grad_w @ b.T + inconsistent_scale * rng.normal(size=(d_in, rank))
  grad_b = a.T @ grad_w + inconsistent_scale * rng.normal(size=(rank, d_out))
  damping, floor = 1e-4, 1e-8
  with jax.enable_x64(True):
    params = {"p": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
    grads = {"p": {"lora_a": jnp.asarray(grad_a), "lora_b": jnp.asarray(grad_b)}}
    tx = ap.scale_by_adaprelora(damping=damping, damping_floor=floor)
    updates, state = tx.update(grads, tx.init(params), params)
    rows, cols = ap.second_moments(state, params)
    p, q = (
      np.asarray(x)
      for x in ap.factored_scales(
        jnp.asarray(rows["p"]["lora_a"]), jnp.asarray(cols["p"]["lora_b"])
      )
    )
  delta_a, delta_b = np.asarray(updates["p"]["lora_a"]), np.asarray(updates["p"]["lora_b"])
  assert np.all(np.isfinite(delta_a)) and np.all(np.isfinite(delta_b))
  weight_gradient = _minimum_norm_weight_gradient(a, b, grad_a, grad_b)
  whitened_norm = np.linalg.norm(weight_gradient / np.sqrt(np.outer(p, q)))
  floor_a = damping * np.sum(p[:, None] * a * a) / rank + floor * p.mean()
  floor_b = damping * np.sum(b * b * q[None, :]) / rank + floor * q.mean()
  # Rounding of the projection is amplified by the damped inverses too.
  slack = 1e-9 * (np.linalg.norm(grad_a) + np.linalg.norm(grad_b)) / min(floor_a, floor_b)
  bound = 1.0 + 1e-6
  assert np.linalg.norm(np.sqrt(p)[:, None] * delta_a) <= (
    bound * whitened_norm / (2 * np.sqrt(floor_b)) + slack
  )
  assert np.linalg.norm(delta_b * np.sqrt(q)[None, :]) <= (
    bound * whitened_norm / (2 * np.sqrt(floor_a)) + slack
  )
