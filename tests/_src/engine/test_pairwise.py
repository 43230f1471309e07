"""The per-pair engine (adaprelora_jax/_src/engine/pairwise.py): vmapped and mapped groups."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaprelora_jax as ap
from adaprelora_jax._src.engine import pairwise


def _params_and_grads(seed: int):
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  # Two per-layer groups (q/k share a shape, v does not) and one stacked pair.
  shapes = {"q": ((8, 3), (3, 6)), "k": ((8, 3), (3, 6)), "v": ((8, 3), (3, 5))}
  params = {name: {"lora_a": normal(*a), "lora_b": normal(*b)} for name, (a, b) in shapes.items()}
  params["scan"] = {"lora_a": normal(4, 7, 3), "lora_b": normal(4, 3, 9)}
  grads = [jax.tree.map(lambda x: normal(*x.shape), params) for _ in range(2)]
  return params, grads


def _loops(tx: optax.GradientTransformation, params, grads) -> int:
  """Loops in the lowered update."""
  lowered = jax.jit(tx.update).lower(grads, tx.init(params), params).as_text()
  return lowered.count("stablehlo.while")


def _trajectory(tx: optax.GradientTransformation, params, grads):
  update = jax.jit(tx.update)
  state = tx.init(params)
  steps = []
  for grad in grads * 2:
    updates, state = update(grad, state, params)
    params = optax.apply_updates(params, updates)
    steps.append(updates)
  return steps, state


def test_lora_rite_maps_its_pairs_on_cpu_with_the_vmapped_updates(monkeypatch):
  """LoRA-RITE runs one pair at a time on CPU (batched LAPACK can deadlock
  there, docs/design.md §10); elsewhere its groups are vmapped. Both give
  the same updates and state over several steps."""
  params, grads = _params_and_grads(0)
  # A fresh transform per mode: jax caches the trace of a function it has seen.
  mapped_tx = ap.lora_rite(1e-2)
  mapped_loops = _loops(mapped_tx, params, grads[0])
  mapped = _trajectory(mapped_tx, params, grads)

  monkeypatch.setattr(pairwise, "_default_backend_is_cpu", lambda: False)
  vmapped_tx = ap.lora_rite(1e-2)
  # lax.map is one loop per group (q/k, v, the stacked pair) and pass (first pass, kernel).
  assert mapped_loops == _loops(vmapped_tx, params, grads[0]) + 3 * 2
  vmapped = _trajectory(vmapped_tx, params, grads)
  chex.assert_trees_all_close(mapped, vmapped, rtol=2e-5, atol=1e-6)


def test_adaprelora_stays_vmapped_on_cpu(monkeypatch):
  params, grads = _params_and_grads(1)
  on_cpu = _loops(ap.adaprelora(1e-2), params, grads[0])
  monkeypatch.setattr(pairwise, "_default_backend_is_cpu", lambda: False)
  assert on_cpu == _loops(ap.adaprelora(1e-2), params, grads[0])
