"""The kinds of per-pair state field (adaprelora_jax/_src/engine/slots.py), alone."""

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax._src.discovery import plan as plan_lib
from adaprelora_jax._src.engine import nnx_labels
from adaprelora_jax._src.engine import slots


def _params():
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
    "q": {"lora_a": normal(6, 2), "lora_b": normal(2, 5)},
    "k": {"lora_a": normal(6, 2), "lora_b": normal(2, 5)},
    "scan": {"lora_a": normal(3, 4, 2), "lora_b": normal(3, 2, 7)},
    "head": normal(5),
  }


def _plan():
  params = _params()
  return params, plan_lib.plan_pairs(params)


def _write_then_read(kind, plan, values_per_group):
  labels = nnx_labels.StateLabels(plan)
  entry = kind.init(plan, labels)
  positions = [
    [jnp.asarray(i, jnp.int32) for i in range(len(group.members))] for group in plan.groups
  ]
  entry = kind.write(plan, entry, values_per_group, positions, labels)
  return entry, kind.read(plan, entry, "field")


def _group_values(plan, shape_of):
  rng = np.random.default_rng(1)
  return [
    jnp.asarray(rng.normal(size=(group.size, *shape_of(group.members[0]))), jnp.float32)
    for group in plan.groups
  ]


@pytest.mark.parametrize("dims", [("d_in", "rank"), ("rank", "rank"), ("d_in",), ()])
def test_slot_round_trips_every_group(dims):
  _, plan = _plan()
  slot = slots.Slot("a", dims)
  values = _group_values(plan, lambda pair: slots.pair_shape(pair, dims)[len(pair.lead_shape) :])
  entry, read = _write_then_read(slot, plan, values)
  chex.assert_trees_all_close(read, values)
  assert entry["head"] == optax.MaskedNode() and entry["q"]["lora_b"] == optax.MaskedNode()
  assert entry["scan"]["lora_a"].shape == (3, *slots.pair_shape(plan.pairs[-1], dims)[1:])


def test_slots_give_the_kernel_a_tuple_in_declared_order():
  _, plan = _plan()
  kind = slots.as_field(
    "momentum", (slots.Slot("b", ("rank", "d_out")), slots.Slot("a", ("d_in", "rank")))
  )
  b_values = _group_values(plan, lambda pair: (pair.rank, pair.d_out))
  a_values = _group_values(plan, lambda pair: (pair.d_in, pair.rank))
  _, read = _write_then_read(kind, plan, list(zip(b_values, a_values, strict=True)))
  chex.assert_trees_all_close(read, list(zip(b_values, a_values, strict=True)))


def test_group_slot_is_stacked_per_group_and_unstacks_to_a_mirror():
  _, plan = _plan()
  kind = slots.GroupSlot("b", ("d_out",))
  values = _group_values(plan, lambda pair: (pair.d_out,))
  entry, read = _write_then_read(kind, plan, values)
  assert [array.shape for array in entry] == [kind.group_shape(g) for g in plan.groups]
  chex.assert_trees_all_close(read, values)
  tree = kind.unstack(plan, entry)
  by_size = {group.size: value for group, value in zip(plan.groups, values, strict=True)}
  np.testing.assert_array_equal(tree["scan"]["lora_b"], by_size[3])
  with pytest.raises(ValueError, match="one array per group"):
    kind.read(plan, entry[:1], "col_second_moment")


def test_pair_scalar_is_one_vector_in_pair_row_order():
  _, plan = _plan()
  kind = slots.PairScalar(jnp.int32)
  values = [
    jnp.arange(group.size, dtype=jnp.int32) + 10 * index for index, group in enumerate(plan.groups)
  ]
  entry, read = _write_then_read(kind, plan, values)
  assert entry.shape == (plan.num_rows,) and entry.dtype == jnp.int32
  chex.assert_trees_all_close(read, values)


def test_state_dtype_is_a_floating_minimum_and_exact_otherwise():
  assert slots.state_dtype(jnp.float32, jnp.bfloat16) == jnp.float32
  assert slots.state_dtype(jnp.float32, jnp.float16) == jnp.float32
  assert slots.state_dtype(jnp.int32, jnp.float32) == jnp.int32


def test_one_field_takes_at_most_one_slot_per_factor():
  with pytest.raises(ValueError, match="'momentum' needs at most one slot per factor"):
    slots.as_field(
      "momentum", (slots.Slot("a", ("d_in", "rank")), slots.Slot("a", ("rank", "rank")))
    )
