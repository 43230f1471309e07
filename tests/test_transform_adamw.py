"""adaprelora_adamw, the paper's AdaPreLoRA AdamW variant as this library reads
it: against a float64 transcription, and its optax contract."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaprelora_jax as ap
from tests import reference

NEAR_EXACT = dict(damping=1e-13, damping_floor=1e-15)
SHAPES = {"q": (7, 6, 2), "k": (7, 6, 2), "ffn": (5, 9, 3)}
HEAD = 4


def _problem(seed, *, stats):
  rng = np.random.default_rng(seed)
  pairs = {
    name: (rng.normal(size=(d_in, rank)), rng.normal(size=(rank, d_out)))
    for name, (d_in, d_out, rank) in SHAPES.items()
  }
  head = rng.normal(size=HEAD)
  params = {
    name: {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)} for name, (a, b) in pairs.items()
  }
  if stats:
    for name, (a, b) in pairs.items():
      params[name]["grad_sq_rows"] = jnp.zeros(a.shape[0])
      params[name]["grad_sq_cols"] = jnp.zeros(b.shape[1])
  params["head"] = jnp.asarray(head)
  return rng, pairs, head, params


def _factor_grads(params, weight_grads, head_grad, *, stats):
  """Backprop's factor gradients (and exact statistics) of dense G's."""
  grads = {}
  for name, grad_w in weight_grads.items():
    a, b = np.asarray(params[name]["lora_a"]), np.asarray(params[name]["lora_b"])
    grads[name] = {"lora_a": grad_w @ b.T, "lora_b": a.T @ grad_w}
    if stats:
      grads[name]["grad_sq_rows"] = np.mean(grad_w**2, axis=1)
      grads[name]["grad_sq_cols"] = np.mean(grad_w**2, axis=0)
  grads["head"] = head_grad
  return jax.tree.map(jnp.asarray, grads)


@pytest.mark.parametrize("statistics", ["exact", "surrogate", "tangent"])
def test_five_steps_match_the_float64_transcription(statistics):
  """Several groups, a non-LoRA head, weight decay: the whole chain for 5 steps."""
  stats = statistics == "exact"
  learning_rate, weight_decay, steps = 3e-2, 0.1, 5
  with jax.enable_x64(True):
    rng, pairs, head, params = _problem(0, stats=stats)
    weight_grads = [
      {name: rng.normal(size=shape[:2]) * (1 + 3 * t) for name, shape in SHAPES.items()}
      for t in range(steps)
    ]
    head_grads = [rng.normal(size=HEAD) for _ in range(steps)]
    tx = ap.adaprelora_adamw(
      learning_rate, weight_decay=weight_decay, statistics=statistics, **NEAR_EXACT
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
      grads = _factor_grads(params, weight_grads[t], head_grads[t], stats=stats)
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
    want_pairs, want_head = reference.adaprelora_adamw_run(
      pairs,
      head,
      [lambda _, g=g: g for g in weight_grads],
      [lambda _, g=g: g for g in head_grads],
      learning_rate=learning_rate,
      weight_decay=weight_decay,
      statistics=statistics,
    )
  want = {name: {"lora_a": a, "lora_b": b} for name, (a, b) in want_pairs.items()}
  want["head"] = want_head
  got = {name: {k: params[name][k] for k in ("lora_a", "lora_b")} for name in SHAPES}
  got["head"] = params["head"]
  chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-9)
  if stats:
    # The probes are not parameters: they never move.
    assert all(float(jnp.abs(params[name]["grad_sq_rows"]).max()) == 0.0 for name in SHAPES)


def test_the_transcription_is_sensitive_to_the_preconditioner():
  """The check above can fail: dropping the preconditioner (plain AdamW on
  the factor gradients) moves the factors far beyond its tolerance."""
  with jax.enable_x64(True):
    rng, pairs, head, params = _problem(1, stats=False)
    weight_grads = {name: rng.normal(size=shape[:2]) for name, shape in SHAPES.items()}
    head_grad = rng.normal(size=HEAD)
    grads = _factor_grads(params, weight_grads, head_grad, stats=False)
    ours = ap.adaprelora_adamw(1e-2, statistics="tangent", **NEAR_EXACT)
    plain = optax.adamw(1e-2, weight_decay=0.0)
    ours_updates, _ = ours.update(grads, ours.init(params), params)
    plain_updates, _ = plain.update(grads, plain.init(params), params)
  difference = [
    float(jnp.max(jnp.abs(ours_updates[name][k] - plain_updates[name][k])))
    for name in SHAPES
    for k in ("lora_a", "lora_b")
  ]
  assert max(difference) > 1e-3


def test_non_lora_leaves_get_exactly_one_adamw():
  """The head's updates are optax.adamw's, step for step (not Adam of Adam)."""
  rng, _, _, params = _problem(2, stats=True)
  tx = ap.adaprelora_adamw(1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05)
  reference_tx = optax.adamw(1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05)
  head_params = {"head": params["head"]}
  state, reference_state = tx.init(params), reference_tx.init(head_params)
  for _ in range(4):
    weight_grads = {name: rng.normal(size=shape[:2]) for name, shape in SHAPES.items()}
    grads = _factor_grads(params, weight_grads, rng.normal(size=HEAD), stats=True)
    updates, state = tx.update(grads, state, params)
    want, reference_state = reference_tx.update(
      {"head": grads["head"]}, reference_state, head_params
    )
    chex.assert_trees_all_close(updates["head"], want["head"], rtol=1e-6, atol=1e-8)
    params = optax.apply_updates(params, updates)
    head_params = optax.apply_updates(head_params, want)


def test_first_step_has_adamws_units():
  """Adam's first step is ``lr · sign(direction)``: the learning rate is a
  per-coordinate step, as AdamW's, whatever the scale of the gradients."""
  rng, _, _, params = _problem(3, stats=False)
  weight_grads = {name: 1e3 * rng.normal(size=shape[:2]) for name, shape in SHAPES.items()}
  grads = _factor_grads(params, weight_grads, rng.normal(size=HEAD), stats=False)
  tx = ap.adaprelora_adamw(1e-3, eps=0.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in SHAPES:
    for factor in ("lora_a", "lora_b"):
      magnitudes = np.abs(np.asarray(updates[name][factor]))
      np.testing.assert_allclose(magnitudes[magnitudes > 0], 1e-3, rtol=1e-5)


def test_inject_hyperparams_changes_learning_rate_and_adam_moments():
  rng, _, _, params = _problem(4, stats=False)
  weight_grads = {name: rng.normal(size=shape[:2]) for name, shape in SHAPES.items()}
  grads = _factor_grads(params, weight_grads, rng.normal(size=HEAD), stats=False)
  injected = optax.inject_hyperparams(ap.adaprelora_adamw, static_args=("statistics",))(
    learning_rate=1e-2, b1=0.9, b2=0.999, statistics="surrogate"
  )
  plain = ap.adaprelora_adamw(1e-2, statistics="surrogate")
  state = injected.init(params)
  got, state = jax.jit(injected.update)(grads, state, params)
  want, _ = plain.update(grads, plain.init(params), params)
  # Injected hyperparameters are float32 arrays: 1 − b2 rounds at ~1e-5.
  chex.assert_trees_all_close(got, want, rtol=1e-4)
  state.hyperparams["learning_rate"] = jnp.asarray(5e-3)
  halved, _ = jax.jit(injected.update)(grads, state, params)
  # Same gradient twice: Adam's second step equals its first, at the new rate.
  chex.assert_trees_all_close(halved, jax.tree.map(lambda u: 0.5 * u, got), rtol=1e-5, atol=1e-9)


def test_multisteps_equals_one_step_on_the_mean_gradient():
  """optax.MultiSteps: k micro-batches average into one AdaPreLoRA AdamW step."""
  rng, _, _, params = _problem(5, stats=True)
  micro = [
    _factor_grads(
      params,
      {name: rng.normal(size=shape[:2]) for name, shape in SHAPES.items()},
      rng.normal(size=HEAD),
      stats=True,
    )
    for _ in range(2)
  ]
  accumulated = optax.MultiSteps(ap.adaprelora_adamw(1e-2), every_k_schedule=2)
  state = accumulated.init(params)
  first, state = accumulated.update(micro[0], state, params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(first))
  got, state = accumulated.update(micro[1], state, params)
  single = ap.adaprelora_adamw(1e-2)
  mean = jax.tree.map(lambda x, y: (x + y) / 2, *micro)
  want, _ = single.update(mean, single.init(params), params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)


def test_a_nonfinite_pair_is_skipped_and_its_statistics_kept():
  rng, _, _, params = _problem(6, stats=False)
  tx = ap.adaprelora_adamw(1e-2)
  state = tx.init(params)
  weight_grads = {name: rng.normal(size=shape[:2]) for name, shape in SHAPES.items()}
  grads = _factor_grads(params, weight_grads, rng.normal(size=HEAD), stats=False)
  _, state = tx.update(grads, state, params)
  rows_before, _ = ap.second_moments(state, params)
  bad = jax.tree.map(lambda x: x, grads)
  bad["q"]["lora_a"] = bad["q"]["lora_a"].at[0, 0].set(jnp.nan)
  updates, state = tx.update(bad, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert ap.nonfinite_report(state, params) == {"q/lora_a": 1}
  rows_after, _ = ap.second_moments(state, params)
  np.testing.assert_array_equal(rows_after["q"]["lora_a"], rows_before["q"]["lora_a"])
  assert not np.array_equal(rows_after["k"]["lora_a"], rows_before["k"]["lora_a"])
