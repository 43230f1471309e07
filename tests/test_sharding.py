"""Sharded optimizer state and updates on 8 emulated CPU devices.

tests/conftest.py starts XLA with 8 host devices. Three layouts of the LoRA
factors: FSDP-like (``lora_a``'s d_in sharded), tensor-parallel (``lora_b``'s
d_out sharded) and a 2-D (data × model) mesh with both, plus stacked layers.
"""

import re

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaprelora_jax as ap
from adaprelora_jax import sharding

D_IN, RANK, D_OUT, LAYERS = 64, 4, 48, 2
AUTO = jax.sharding.AxisType.Auto

# name -> (mesh shape, mesh axes, spec of lora_a (d_in, r), spec of lora_b (r, d_out))
LAYOUTS = {
  "fsdp": ((8,), ("data",), P("data", None), P(None, None)),
  "tensor_parallel": ((8,), ("model",), P(None, None), P(None, "model")),
  "2d": ((2, 4), ("data", "model"), P("data", None), P(None, "model")),
}

# name -> constructor taking the optimizer's keyword arguments (pairing).
OPTIMIZERS = {
  "adaprelora": lambda **kw: ap.adaprelora(1e-2, **kw),
  "adaprelora_momentum": lambda **kw: ap.adaprelora(1e-2, b1=0.9, weight_decay=1e-2, **kw),
  "adaprelora_adamw": lambda **kw: ap.adaprelora_adamw(1e-3, weight_decay=1e-2, **kw),
  "adaprelora_adamw_surrogate": lambda **kw: ap.adaprelora_adamw(
    1e-3, statistics="surrogate", **kw
  ),
  "lora_plus": lambda **kw: ap.lora_plus(1e-3, lr_ratio=16.0, **kw),
  "scaled_gd": lambda **kw: ap.scaled_gd(1e-2, **kw),
  "scaled_adamw": lambda **kw: ap.scaled_adamw(1e-3, **kw),
  "lora_pro": lambda **kw: ap.lora_pro(1e-3, **kw),
  "lora_pro_full": lambda **kw: ap.lora_pro(1e-3, mode="full", **kw),
  "lora_rite": lambda **kw: ap.lora_rite(1e-3, **kw),
}


def _mesh(layout):
  shape, axes, _, _ = LAYOUTS[layout]
  return jax.make_mesh(shape, axes, axis_types=(AUTO,) * len(axes))


def _params(key):
  """Three single pairs, one stacked (LAYERS, ...) pair and a non-LoRA bias."""
  keys = iter(jax.random.split(key, 16))

  def pair(*lead):
    return {
      "lora_a": jax.random.normal(next(keys), (*lead, D_IN, RANK)),
      "lora_b": 0.3 * jax.random.normal(next(keys), (*lead, RANK, D_OUT)),
    }

  return {
    "q": pair(),
    "k": pair(),
    "v": pair(),
    "stacked": pair(LAYERS),
    "bias": jax.random.normal(next(keys), (D_OUT,)),
  }


def _gradients(params, key):
  """Gradients of a loss of ΔW = a b: ``g_a = G bᵀ``, ``g_b = aᵀ G``."""
  keys = iter(jax.random.split(key, 8))
  grads = {}
  for name, leaf in params.items():
    if name == "bias":
      grads[name] = jax.random.normal(next(keys), leaf.shape)
      continue
    a, b = leaf["lora_a"], leaf["lora_b"]
    g = jax.random.normal(next(keys), (*a.shape[:-1], b.shape[-1]))
    grads[name] = {"lora_a": g @ jnp.swapaxes(b, -1, -2), "lora_b": jnp.swapaxes(a, -1, -2) @ g}
  return grads


def _param_shardings(params, layout, mesh):
  _, _, spec_a, spec_b = LAYOUTS[layout]

  def spec(path, leaf):
    name = jax.tree_util.keystr(path)
    lead = (None,) * (leaf.ndim - 2)
    if "lora_a" in name:
      return NamedSharding(mesh, P(*lead, *spec_a))
    if "lora_b" in name:
      return NamedSharding(mesh, P(*lead, *spec_b))
    return NamedSharding(mesh, P(spec_b[1]))  # the bias runs along d_out

  return jax.tree_util.tree_map_with_path(spec, params)


def _megatron_shardings(params, mesh):
  """Megatron-style tensor parallelism on a ("model",) mesh: ``q``, ``k`` and
  the stacked pair column-parallel (d_out sharded), ``v`` row-parallel (d_in
  sharded), so pairs of one shape are sharded differently."""
  column = {"lora_a": P(None, None), "lora_b": P(None, "model")}
  row = {"lora_a": P("model", None), "lora_b": P(None, None)}
  specs = {
    "q": column,
    "k": column,
    "v": row,
    "stacked": {name: P(None, *spec) for name, spec in column.items()},
    "bias": P("model"),
  }
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def _group_entry(params, entry, pair_name):
  """The array (or sharding) of a group-stacked state entry for the group
  holding ``pair_name``."""
  groups = ap.plan_pairs(params).groups
  (index,) = [
    i for i, group in enumerate(groups) if pair_name in [pair.name for pair in group.members]
  ]
  return entry[index]


def _steps(tx, params, grads_list, param_shardings=None, state_shardings=None):
  """Runs the updates under jit (sharded when shardings are given)."""
  if param_shardings is None:
    init, update = jax.jit(tx.init), jax.jit(tx.update)
  else:
    params = jax.device_put(params, param_shardings)
    grads_list = [jax.device_put(g, param_shardings) for g in grads_list]
    init = jax.jit(tx.init, out_shardings=state_shardings)
    update = jax.jit(
      tx.update,
      in_shardings=(param_shardings, state_shardings, param_shardings),
      out_shardings=(param_shardings, state_shardings),
    )
  state = init(params)
  for grads in grads_list:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.fixture(scope="module")
def problem():
  params = _params(jax.random.key(0))
  return params, [_gradients(params, jax.random.key(step)) for step in (1, 2, 3)]


def test_eight_devices_are_available():
  assert jax.device_count() == 8, "tests/conftest.py must set 8 host devices"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sharded_steps_equal_unsharded(problem, layout, name):
  params, _ = problem
  _check_sharded_steps(problem, OPTIMIZERS[name](), _param_shardings(params, layout, _mesh(layout)))


def _check_sharded_steps(problem, tx, param_shardings, pairing="nnx"):
  """Sharded steps of ``tx`` equal unsharded ones and keep the layouts."""
  params, grads_list = problem
  state_shardings = sharding.state_shardings(tx, params, param_shardings, pairing=pairing)
  expected, expected_state = _steps(tx, params, grads_list)
  got, got_state = _steps(tx, params, grads_list, param_shardings, state_shardings)
  chex.assert_trees_all_close(got, expected, rtol=2e-4, atol=2e-6)
  chex.assert_trees_all_close(got_state, expected_state, rtol=2e-4, atol=2e-6)
  # The parameters keep their layout and the state has the one asked for.
  for leaf, want in _leaf_pairs(got, param_shardings):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  for leaf, want in _leaf_pairs(got_state, state_shardings):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def _leaf_pairs(tree, other):
  """The leaves of two trees side by side, once they have one structure.

  ``zip`` of their leaves alone would stop at the shorter tree and pair
  leaves of different positions.
  """
  chex.assert_trees_all_equal_structs(tree, other)
  return list(zip(jax.tree.leaves(tree), jax.tree.leaves(other), strict=True))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_state_follows_the_factor_axes(problem, layout):
  params, _ = problem
  mesh = _mesh(layout)
  _, _, spec_a, spec_b = LAYOUTS[layout]
  # The params hold a bias: the alias routes it by optax.partition.
  state = sharding.state_shardings(
    ap.adaprelora(1e-2, b1=0.9), params, _param_shardings(params, layout, mesh)
  )
  pairs = optax.tree_utils.tree_get(state, "pairs")

  # Second moments, stacked per group: the pair axis is replicated.
  def rows(name):
    return _group_entry(params, pairs.row_second_moment, name).spec

  def cols(name):
    return _group_entry(params, pairs.col_second_moment, name).spec

  assert rows("q") == P(None, spec_a[0]) and cols("q") == P(None, spec_b[1])
  assert rows("stacked") == P(None, None, spec_a[0])
  assert cols("stacked") == P(None, None, spec_b[1])
  # Momentum is shaped like the factors and sharded like them.
  assert pairs.momentum["q"]["lora_a"].spec == P(*spec_a)
  assert pairs.momentum["stacked"]["lora_b"].spec == P(None, *spec_b)
  # Skip counters, one vector for all pairs, are replicated.
  assert all(axis is None for axis in pairs.nonfinite_count.spec)
  # r×r state (LoRA-RITE) is replicated; LoRA-Pro's (d_in, d_out) moment is
  # sharded like both factors.
  rite = sharding.state_shardings(
    ap.lora_rite(1e-3), params, _param_shardings(params, layout, mesh)
  )
  abstract = jax.eval_shape(ap.lora_rite(1e-3).init, params)
  for shape, spec in _leaf_pairs(abstract, rite):
    if shape.shape[-2:] == (RANK, RANK):
      assert all(entry is None for entry in spec.spec), (shape.shape, spec)
  full = sharding.state_shardings(
    ap.lora_pro(1e-3, mode="full"), params, _param_shardings(params, layout, mesh)
  )
  abstract = jax.eval_shape(ap.lora_pro(1e-3, mode="full").init, params)
  full_specs = [s.spec for a, s in _leaf_pairs(abstract, full) if a.shape == (D_IN, D_OUT)]
  assert full_specs and all(spec == P(spec_a[0], spec_b[1]) for spec in full_specs)


def test_partition_specs_in_partition_specs_out_through_wrappers(problem):
  params, _ = problem
  specs = jax.tree.map(lambda s: s.spec, _param_shardings(params, "2d", _mesh("2d")))
  tx = optax.chain(
    optax.clip_by_global_norm(1.0), optax.inject_hyperparams(ap.adaprelora)(learning_rate=1e-2)
  )
  out = sharding.state_shardings(tx, params, specs)
  assert all(
    isinstance(leaf, P) for leaf in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, P))
  )
  pairs = optax.tree_utils.tree_get(out, "pairs")
  assert _group_entry(params, pairs.row_second_moment, "v") == P(None, "data")
  assert _group_entry(params, pairs.col_second_moment, "v") == P(None, "model")
  assert out[1].hyperparams["learning_rate"] == P()


def test_peft_layout_is_supported():
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    "lora_A": {"weight": jax.random.normal(keys[0], (RANK, D_IN))},
    "lora_B": {"weight": jax.random.normal(keys[1], (D_OUT, RANK))},
  }
  specs = {"lora_A": {"weight": P(None, "data")}, "lora_B": {"weight": P("model", None)}}
  state = sharding.state_shardings(
    ap.scale_by_adaprelora(pairing="peft"), params, specs, pairing="peft"
  )
  assert state.pairs.row_second_moment == (P(None, "data"),)
  assert state.pairs.col_second_moment == (P(None, "model"),)


def test_mismatched_sharding_rank_names_the_parameter(problem):
  params, _ = problem
  specs = jax.tree.map(lambda leaf: P(), params)
  specs["q"]["lora_a"] = P("data", None, None)
  with pytest.raises(ValueError, match=r"\['q'\]\['lora_a'\]|q/lora_a|q.lora_a"):
    sharding.state_shardings(ap.adaprelora(1e-2), params, specs)


_ALL_GATHER = re.compile(r"=\s*(\(?[^=]*?\)?)\s*all-gather(?:-start)?\(")
_FULL_FACTOR_DIM = re.compile(rf"\b({D_IN}|{D_OUT})\b")


def _gathered_factor_shapes(hlo: str) -> list[str]:
  """Result shapes of the all-gathers in ``hlo`` that hold a full d_in or d_out."""
  gathered = [match.group(1) for match in _ALL_GATHER.finditer(hlo)]
  return [shape for shape in gathered if _FULL_FACTOR_DIM.search(shape)]


def test_the_all_gather_check_sees_a_gathered_factor():
  """Negative control: a QR of the FSDP-sharded factor needs all of it."""
  factor = NamedSharding(_mesh("fsdp"), LAYOUTS["fsdp"][2])
  qr = jax.jit(lambda a: jnp.linalg.qr(a)[0], in_shardings=factor, out_shardings=factor)
  hlo = qr.lower(jax.ShapeDtypeStruct((D_IN, RANK), jnp.float32)).compile().as_text()
  assert _gathered_factor_shapes(hlo)


@pytest.mark.parametrize("variant", ["adaprelora", "adaprelora_adamw"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_update_never_all_gathers_a_factor(problem, layout, variant):
  """Only r×r (and scalar) reductions cross devices: no factor is gathered."""
  params, grads_list = problem
  tx = getattr(ap, variant)(1e-2)
  mesh = _mesh(layout)
  param_shardings = _param_shardings(params, layout, mesh)
  state_shardings = sharding.state_shardings(tx, params, param_shardings)
  state = jax.eval_shape(tx.init, params)
  update = jax.jit(
    tx.update,
    in_shardings=(param_shardings, state_shardings, param_shardings),
    out_shardings=(param_shardings, state_shardings),
  )
  hlo = update.lower(grads_list[0], state, params).compile().as_text()
  assert not _gathered_factor_shapes(hlo)
  assert "all-reduce" in hlo  # the r×r Gram matrices are reduced across shards


def test_nnx_partitioning_metadata_shards_the_optimizer_state():
  mesh = _mesh("2d")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.LoRALinear(
        D_IN,
        D_OUT,
        lora_rank=RANK,
        rngs=rngs,
        a_metadata={"out_sharding": ("data", None)},
        b_metadata={"out_sharding": (None, "model")},
      )

  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, ap.adaprelora(1e-2, b1=0.9), wrt=nnx.LoRAParam)
    inputs = jax.random.normal(jax.random.key(1), (16, D_IN))

    @nnx.jit
    def train_step(model, optimizer, inputs):
      def loss_fn(model):
        return jnp.mean(model.dense(inputs) ** 2)

      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(train_step(model, optimizer, inputs)) for _ in range(3)]
  assert losses[-1] < losses[0]
  # The LoRA factors' part of the alias's optax.partition: the core's per-pair state.
  state = nnx.state(optimizer, nnx.OptState)["opt_state"][0]["inner_states"]["lora"]
  state = state["inner_state"]["pairs"]
  specs = nnx.get_partition_spec(state)

  def lora(tree):
    return tree["dense"]["lora"]

  # One group: the second moments are (1, d_in) and (1, d_out) arrays.
  assert specs["row_second_moment"][0].get_value() == P(None, "data")
  assert specs["col_second_moment"][0].get_value() == P(None, "model")
  assert lora(specs["momentum"])["lora_a"].get_value() == P("data", None)
  row = state["row_second_moment"][0].get_value()
  col = state["col_second_moment"][0].get_value()
  assert row.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 2)
  assert col.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)


def test_shardings_on_two_meshes_are_rejected(problem):
  params, _ = problem
  shardings = _param_shardings(params, "fsdp", _mesh("fsdp"))
  shardings["q"]["lora_b"] = NamedSharding(_mesh("tensor_parallel"), P(None, "model"))
  with pytest.raises(ValueError, match="more than one mesh"):
    sharding.state_shardings(ap.adaprelora(1e-2), params, shardings)


def test_differently_sharded_pairs_of_one_shape_are_rejected(problem):
  """Stacking a row- and a column-parallel pair would gather both."""
  params, _ = problem
  param_shardings = _megatron_shardings(params, _mesh("tensor_parallel"))
  with pytest.raises(ValueError, match=r"'k/lora_a' and 'v/lora_a'.*sharded_pairing"):
    sharding.state_shardings(ap.adaprelora(1e-2), params, param_shardings)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sharded_pairing_steps_equal_unsharded(problem, name):
  params, _ = problem
  param_shardings = _megatron_shardings(params, _mesh("tensor_parallel"))
  pairing = sharding.sharded_pairing(param_shardings)
  _check_sharded_steps(problem, OPTIMIZERS[name](pairing=pairing), param_shardings, pairing)


def test_sharded_pairing_never_all_gathers_a_factor(problem):
  params, grads_list = problem
  param_shardings = _megatron_shardings(params, _mesh("tensor_parallel"))

  def gathered(tx, state_shardings):
    update = jax.jit(
      tx.update,
      in_shardings=(param_shardings, state_shardings, param_shardings),
      out_shardings=(param_shardings, state_shardings),
    )
    state = jax.eval_shape(tx.init, params)
    return _gathered_factor_shapes(update.lower(grads_list[0], state, params).compile().as_text())

  pairing = sharding.sharded_pairing(param_shardings)
  tx = ap.adaprelora(1e-2, pairing=pairing)
  assert not gathered(tx, sharding.state_shardings(tx, params, param_shardings, pairing=pairing))
  # The control: stacking v with q and k (by shape alone) gathers whole
  # factors, whatever layout XLA picks for the state.
  factor = re.compile(rf"\[({D_IN},{RANK}|{RANK},{D_OUT})\]")
  assert any(factor.search(shape) for shape in gathered(ap.adaprelora(1e-2), None))


def test_sharded_pairing_needs_every_factor(problem):
  params, _ = problem
  param_shardings = _megatron_shardings(params, _mesh("tensor_parallel"))
  del param_shardings["v"]
  with pytest.raises(ValueError, match="no sharding given for LoRA factor 'v/lora_a'"):
    ap.plan_pairs(params, sharding.sharded_pairing(param_shardings))


def test_nnx_metadata_of_mixed_tensor_parallelism():
  """Row- and column-parallel LoRA layers of one shape: ``init`` names the
  problem; with :func:`sharded_pairing` of the model's partition specs the
  layers train in separate stacks."""
  mesh = _mesh("tensor_parallel")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.column = nnx.LoRALinear(
        D_IN, D_IN, lora_rank=RANK, rngs=rngs, b_metadata={"out_sharding": (None, "model")}
      )
      self.row = nnx.LoRALinear(
        D_IN, D_IN, lora_rank=RANK, rngs=rngs, a_metadata={"out_sharding": ("model", None)}
      )

    def __call__(self, x):
      return self.row(self.column(x))

  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'column/lora/lora_a' and 'row/lora/lora_a'"):
      nnx.Optimizer(model, ap.adaprelora(1e-2), wrt=nnx.LoRAParam)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
    pairing = sharding.sharded_pairing(specs)
    optimizer = nnx.Optimizer(model, ap.adaprelora(1e-2, pairing=pairing), wrt=nnx.LoRAParam)
    inputs = jax.random.normal(jax.random.key(1), (16, D_IN))

    @nnx.jit
    def train_step(model, optimizer, inputs):
      def loss_fn(model):
        return jnp.mean((model(inputs) - inputs) ** 2)

      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(train_step(model, optimizer, inputs)) for _ in range(3)]
  assert losses[-1] < losses[0]
  assert len(ap.plan_pairs(nnx.state(model, nnx.LoRAParam), pairing).groups) == 2
