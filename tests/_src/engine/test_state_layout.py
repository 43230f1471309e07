"""The optimizer-state layout version (adaprelora_jax/_src/engine/state_layout.py).

``tests/fixtures/layout2_adaprelora_state`` is a real layout-2 checkpoint: an
``ap.adaprelora(1e-2, b1=0.9)`` state after one update of
``{"layer": {"lora_a": full((4, 2), 0.5), "lora_b": zeros((2, 3))}}``, saved
with ``ocp.StandardCheckpointer`` by adaprelora_jax at commit e936038 (0.1.0
layout, before the version leaf).
"""

import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import adaprelora_jax as ap
from tests.optimizers import EVERY_OPTIMIZER

LAYOUT2_CHECKPOINT = Path(__file__).parents[2] / "fixtures" / "layout2_adaprelora_state"
# adaprelora(1e-2, b1=0.9) after one update, saved by commit 0ce8979 (layout
# 3: the cores' own non_lora field, before per-step metrics existed).
LAYOUT3_CHECKPOINT = Path(__file__).parents[2] / "fixtures" / "layout3_adaprelora_state"
# The same state after the same update (_params, _GRADS), saved in layout 4
# (the other leaves in an optax.partition, the engine's bookkeeping nested).
LAYOUT4_CHECKPOINT = Path(__file__).parents[2] / "fixtures" / "layout4_adaprelora_state"
_GRADS = {"layer": {"lora_a": jnp.full((4, 2), 0.1), "lora_b": jnp.full((2, 3), -0.2)}}


def _params():
  return {"layer": {"lora_a": jnp.full((4, 2), 0.5), "lora_b": jnp.zeros((2, 3))}}


def _versions(state):
  return [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    if jax.tree_util.keystr(path).endswith(".layout_version")
  ]


def _save(path, state):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()


@pytest.mark.parametrize("name", sorted(EVERY_OPTIMIZER))
def test_every_state_carries_the_layout_version_through_updates(name):
  tx = EVERY_OPTIMIZER[name]()
  params = _params()
  state = tx.init(params)
  assert _versions(state), "no layout_version in the state"
  _, state = jax.jit(tx.update)(params, state, params)
  for version in _versions(state):
    assert version.dtype == jnp.int32 and int(version) == ap.STATE_LAYOUT_VERSION


def test_checkpoint_of_this_layout_passes_and_restores(tmp_path):
  tx = ap.adaprelora(1e-2, b1=0.9)
  params = _params()
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  _save(tmp_path / "state", state)
  ap.check_checkpoint_layout(tmp_path / "state", state)
  restored = ocp.StandardCheckpointer().restore(tmp_path / "state", tx.init(params))
  chex.assert_trees_all_equal(restored, state)


def _leaves_by_path(tree):
  """Leaves keyed by path, with NamedTuple fields spelled as orbax's raw dicts spell them."""
  return {
    re.sub(r"\.(\w+)", r"['\1']", jax.tree_util.keystr(path)): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_layout4_checkpoint_restores_bit_for_bit():
  params = _params()
  tx = ap.adaprelora(1e-2, b1=0.9)
  _, state = tx.update(_GRADS, tx.init(params), params)
  ap.check_checkpoint_layout(LAYOUT4_CHECKPOINT, state)
  restored = ocp.StandardCheckpointer().restore(LAYOUT4_CHECKPOINT, tx.init(params))
  # Bit for bit against the bytes on disk, read without a target.
  chex.assert_trees_all_equal(
    _leaves_by_path(restored),
    _leaves_by_path(ocp.StandardCheckpointer().restore(LAYOUT4_CHECKPOINT)),
  )
  # Into today's layout: same tree, shapes and dtypes as today's state after the same step.
  # (Not its values: a = 0.5 everywhere is a degenerate pair, whose step XLA versions resolve
  # differently; CI also runs the oldest jax supported.)
  chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)


def test_real_layout3_checkpoint_is_named_instead_of_a_tree_mismatch():
  target = ap.adaprelora(1e-2, b1=0.9).init(_params())
  with pytest.raises(ValueError) as orbax_error:
    ocp.StandardCheckpointer().restore(LAYOUT3_CHECKPOINT, target)
  assert "state layout" not in str(orbax_error.value)
  with pytest.raises(ap.StateLayoutError) as error:
    ap.check_checkpoint_layout(LAYOUT3_CHECKPOINT, target)
  assert str(error.value).startswith(
    f"the checkpoint at {LAYOUT3_CHECKPOINT} holds optimizer state layout 3 "
    "(at [0]['layout_version']); this adaprelora_jax reads state layout 4."
  )


def test_real_layout2_checkpoint_is_named_instead_of_a_tree_mismatch():
  target = ap.adaprelora(1e-2, b1=0.9).init(_params())
  # Without the check, orbax fails on the tree structure.
  with pytest.raises(ValueError) as orbax_error:
    ocp.StandardCheckpointer().restore(LAYOUT2_CHECKPOINT, target)
  assert "state layout" not in str(orbax_error.value)
  with pytest.raises(ap.StateLayoutError) as error:
    ap.check_checkpoint_layout(LAYOUT2_CHECKPOINT, target)
  message = str(error.value)
  assert "state layout 2 or older" in message
  assert f"reads state layout {ap.STATE_LAYOUT_VERSION}" in message
  assert str(LAYOUT2_CHECKPOINT) in message


def test_a_saved_version_other_than_this_one_is_named_with_its_path(tmp_path):
  tx = ap.lora_pro(1e-2)  # versions at two places: the projection's and Adam's stage
  state = tx.init(_params())
  versions = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_leaves_with_path(state)
    if jax.tree_util.keystr(path).endswith(".layout_version")
  ]
  assert len(versions) == 2
  older = jax.tree_util.tree_map_with_path(
    lambda path, leaf: (
      jnp.asarray(2, jnp.int32) if jax.tree_util.keystr(path) == versions[1] else leaf
    ),
    state,
  )
  _save(tmp_path / "state", older)
  with pytest.raises(ap.StateLayoutError) as error:
    ap.check_checkpoint_layout(tmp_path / "state", state)
  saved_path = "[0]['inner_states']['lora']['inner_state'][1]['layout_version']"
  assert str(error.value).startswith(
    f"the checkpoint at {tmp_path / 'state'} holds optimizer state layout 2 "
    f"(at {saved_path}); this adaprelora_jax reads state layout 4."
  )


def test_check_on_trees_read_without_a_target():
  state = ap.scale_by_adaprelora().init(_params())
  ap.check_state_layout(state, state)
  # As orbax gives back NamedTuples: dicts.
  saved = {**state._asdict(), "bookkeeping": state.bookkeeping._asdict()}
  ap.check_state_layout(saved, state)
  del saved["bookkeeping"]["layout_version"]
  with pytest.raises(ap.StateLayoutError, match="without a layout version"):
    ap.check_state_layout(saved, state, source="my state")
  # States of other libraries carry no version: nothing to check.
  ap.check_state_layout({}, optax.adam(1e-3).init(_params()))


def test_nnx_optimizer_checkpoint_is_checked(tmp_path):

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.LoRALinear(4, 3, lora_rank=2, rngs=rngs)

  optimizer = nnx.Optimizer(Model(nnx.Rngs(0)), ap.adaprelora(1e-2), wrt=nnx.LoRAParam)
  opt_state = nnx.state(optimizer, nnx.OptState)
  _save(tmp_path / "state", opt_state)
  ap.check_checkpoint_layout(tmp_path / "state", opt_state)
  ocp.StandardCheckpointer().restore(tmp_path / "state", opt_state)
  with pytest.raises(ap.StateLayoutError, match="or older"):
    ap.check_checkpoint_layout(LAYOUT2_CHECKPOINT, opt_state)
