"""N-D LoRA factors (docs/design.md §9): dimension numbers, gather/scatter,
declared layouts (MaxText's scan axis), state shardings and the LoRA scale."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import adaprelora_jax as ap
from adaprelora_jax import dimension_numbers
from adaprelora_jax import pairing as pairing_lib
from adaprelora_jax import sharding

Dims = pairing_lib.LoRADimensionNumbers

# Disjoint size ranges: a rank never equals a batch, d_in or d_out size, so
# the only way a generated layout can be misread is the one the pairing must
# call ambiguous (a MaxText-like axis pair, see below).
_RANKS = st.integers(2, 3)
_BATCH = st.lists(st.integers(5, 6), max_size=2)
_FEATURES = st.lists(st.integers(7, 9), min_size=1, max_size=3)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(rank=_RANKS, batch=_BATCH, inputs=_FEATURES, outputs=_FEATURES)
def test_inference_recovers_leading_batch_layouts(rank, batch, inputs, outputs):
  """``a (*batch, *in, r)``, ``b (*batch, r, *out)`` is read back, unless it
  also fits a scan-axis reading (then it must be reported as ambiguous)."""
  a_shape, b_shape = (*batch, *inputs, rank), (*batch, rank, *outputs)
  k = len(batch)
  scan_like = k == 0 and len(inputs) >= 2 and len(outputs) >= 2 and inputs[-1] == outputs[0]
  if scan_like:
    with pytest.raises(ValueError, match="fit several layouts.*annotate_pairing"):
      dimension_numbers.infer_dimension_numbers(a_shape, b_shape)
    return
  dims = dimension_numbers.infer_dimension_numbers(a_shape, b_shape)
  assert dims == Dims(
    tuple(range(k)),
    len(a_shape) - 1,
    tuple(range(k)),
    k,
    tuple(range(k, len(a_shape) - 1)),
    tuple(range(k + 1, len(b_shape))),
  )


@pytest.mark.parametrize(
  "a_shape,b_shape,d_in,d_out",
  [
    ((16, 4), (4, 4, 8), 16, 32),  # 'BTD,NDH->BTNH'
    ((16, 4), (4, 2, 4, 8), 16, 64),  # 'BTD,CNDH->CBTNH'
    ((4, 8, 4), (4, 16), 32, 16),  # 'BTNH,NHD->BTD'
    ((2, 16, 4), (4, 32), 32, 32),  # MoE 'EBD,EDF->EBF'
  ],
)
def test_qwix_einsum_layouts_have_no_batch_axes(a_shape, b_shape, d_in, d_out):
  params = {"w_lora_a": jnp.zeros(a_shape), "w_lora_b": jnp.zeros(b_shape)}
  (pair,) = ap.plan_pairs(params).pairs
  assert (pair.name, pair.lead_shape, pair.d_in, pair.rank, pair.d_out) == ("w", (), d_in, 4, d_out)


def test_batched_dot_general_and_stacked_layers_keep_leading_batch_axes():
  # L == r: also readable as one (L·d, r) @ (r, r·d') map; the stacked
  # layout (every leading axis a batch axis) is kept, as before N-D factors.
  params = {"w_lora_a": jnp.zeros((4, 16, 4)), "w_lora_b": jnp.zeros((4, 4, 12))}
  (pair,) = ap.plan_pairs(params).pairs
  assert (pair.lead_shape, pair.d_in, pair.d_out) == ((4,), 16, 12)


@pytest.mark.parametrize(
  "a_shape,b_shape",
  [
    ((4, 16, 4), (4, 4, 8, 2)),  # stacked 'BTD,NDH' with L == r
    ((16, 3, 4), (4, 3, 8)),  # MaxText's scan axis at 1: a (in, L, r), b (r, L, out)
  ],
)
def test_ambiguous_shapes_name_the_path_and_the_declaration(a_shape, b_shape):
  params = {"blocks": {"w_lora_a": jnp.zeros(a_shape), "w_lora_b": jnp.zeros(b_shape)}}
  with pytest.raises(
    ValueError,
    match=(
      r"'blocks/w'.*'blocks/w_lora_a'.*fit several layouts.*"
      r"annotate_pairing\(dimension_numbers=\{'blocks/w'.*LoRADimensionNumbers"
    ),
  ):
    ap.plan_pairs(params)
  with pytest.raises(ValueError, match="fit several layouts"):
    ap.adaprelora(1e-2).init(params)


@pytest.mark.parametrize(
  "dims,match",
  [
    (Dims(a_batch_axes=(1,)), r"lora_a has batch axes \(1,\) but lora_b has \(\)"),
    (Dims(a_batch_axes=(3,), b_batch_axes=(1,)), "batch axis 3 is out of range"),
    (Dims(a_batch_axes=(0,), b_batch_axes=(1,)), r"batch axis 0 of lora_a has size 16 but"),
    (Dims(a_batch_axes=(1,), b_batch_axes=(1,), a_in_axes=(0, 1)), "each axis exactly once"),
  ],
)
def test_bad_declarations_name_the_pair(dims, match):
  params = {"w_lora_a": jnp.zeros((16, 3, 4)), "w_lora_b": jnp.zeros((4, 3, 8))}
  with pytest.raises(ValueError, match=match):
    ap.plan_pairs(params, pairing_lib.annotate_pairing(dimension_numbers=dims))
  with pytest.raises(ValueError, match=r"'w_lora_a' \(16, 3, 4\)"):
    ap.plan_pairs(params, pairing_lib.annotate_pairing(dimension_numbers=dims))


@st.composite
def _declared_layouts(draw):
  """A pair with batch axes anywhere, declared: (a_shape, b_shape, dims,
  the same pair's canonical permutations and sizes)."""
  rank = draw(_RANKS)
  batch = draw(_BATCH)
  inputs, outputs = draw(_FEATURES), draw(_FEATURES)
  a_roles = ["batch"] * len(batch) + ["in"] * len(inputs) + ["rank"]
  b_roles = ["batch"] * len(batch) + ["out"] * len(outputs) + ["rank"]
  a_order = draw(st.permutations(range(len(a_roles))))
  b_order = draw(st.permutations(range(len(b_roles))))
  sizes_a = [*batch, *inputs, rank]
  sizes_b = [*batch, *outputs, rank]
  # Leaf axis i holds the logical axis a_order[i].
  a_shape = tuple(sizes_a[j] for j in a_order)
  b_shape = tuple(sizes_b[j] for j in b_order)
  where_a = {j: i for i, j in enumerate(a_order)}
  where_b = {j: i for i, j in enumerate(b_order)}
  n = len(batch)
  dims = Dims(
    a_batch_axes=tuple(where_a[j] for j in range(n)),
    a_rank_axis=where_a[len(sizes_a) - 1],
    b_batch_axes=tuple(where_b[j] for j in range(n)),
    b_rank_axis=where_b[len(sizes_b) - 1],
    a_in_axes=tuple(where_a[j] for j in range(n, n + len(inputs))),
    b_out_axes=tuple(where_b[j] for j in range(n, n + len(outputs))),
  )
  return a_shape, b_shape, dims, batch, inputs, outputs, rank


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(layout=_declared_layouts(), members=st.integers(1, 2))
def test_gather_scatter_round_trip(layout, members):
  """gather gives the canonical matrices an independent numpy transpose
  gives; scatter writes them back into the leaf layout exactly."""
  a_shape, b_shape, dims, batch, inputs, outputs, rank = layout
  rng = np.random.default_rng(0)
  params = {
    f"m{i}": {
      "w_lora_a": rng.normal(size=a_shape).astype(np.float32),
      "w_lora_b": rng.normal(size=b_shape).astype(np.float32),
    }
    for i in range(members)
  }
  plan = ap.plan_pairs(params, pairing_lib.annotate_pairing(dimension_numbers=dims))
  (group,) = plan.groups
  assert group.size == members * int(np.prod(batch, dtype=int))
  leaves = plan.leaves(params)
  d_in, d_out = int(np.prod(inputs)), int(np.prod(outputs))
  want_a = np.stack(
    [
      np.transpose(
        params[f"m{i}"]["w_lora_a"], (*dims.a_batch_axes, *dims.a_in_axes, dims.a_rank_axis)
      )
      for i in range(members)
    ]
  ).reshape(-1, d_in, rank)
  want_b = np.stack(
    [
      np.transpose(
        params[f"m{i}"]["w_lora_b"], (*dims.b_batch_axes, dims.b_rank_axis, *dims.b_out_axes)
      )
      for i in range(members)
    ]
  ).reshape(-1, rank, d_out)
  got_a, got_b = plan.gather(leaves, group, "a"), plan.gather(leaves, group, "b")
  np.testing.assert_array_equal(got_a, want_a)
  np.testing.assert_array_equal(got_b, want_b)
  out = [None] * plan.num_leaves
  plan.scatter(out, group, "a", got_a)
  plan.scatter(out, group, "b", got_b)
  chex.assert_trees_all_equal(plan.unflatten(out), params)


def _scan_problem(key, layers=3, d_in=16, rank=4, d_out=12):
  """The same stacked pair in MaxText's scan layout (a (in, L, r),
  b (r, L, out)) and in the leading-layer layout, with gradients of one G."""
  keys = jax.random.split(key, 3)
  a = jax.random.normal(keys[0], (layers, d_in, rank))
  b = 0.5 * jax.random.normal(keys[1], (layers, rank, d_out))
  grads = []
  for step in range(3):
    g = jax.random.normal(jax.random.fold_in(keys[2], step), (layers, d_in, d_out))
    grads.append((g @ jnp.swapaxes(b, -1, -2), jnp.swapaxes(a, -1, -2) @ g))

  def leading(x, y):
    return {"layers": {"w_lora_a": x, "w_lora_b": y}}

  def scan(x, y):
    return {"layers": {"w_lora_a": jnp.moveaxis(x, 0, 1), "w_lora_b": jnp.moveaxis(y, 0, 1)}}

  return leading, scan, (a, b), grads


def _run(tx, params, grads_list):
  state = tx.init(params)
  updates = None
  for grads in grads_list:
    updates, state = jax.jit(tx.update)(grads, state, params)
  return updates, state


def test_declared_scan_axis_equals_the_leading_layer_layout():
  leading, scan, (a, b), grads = _scan_problem(jax.random.key(0))
  pairing = pairing_lib.annotate_pairing(
    dimension_numbers=Dims(a_batch_axes=(1,), b_batch_axes=(1,))
  )
  kwargs = dict(b1=0.9, weight_decay=1e-2)
  want_updates, want_state = _run(
    ap.adaprelora(1e-2, **kwargs), leading(a, b), [leading(*g) for g in grads]
  )
  got_updates, got_state = _run(
    ap.adaprelora(1e-2, pairing=pairing, **kwargs), scan(a, b), [scan(*g) for g in grads]
  )
  (pair,) = ap.plan_pairs(scan(a, b), pairing).pairs
  assert pair.lead_shape == (3,)

  def back(tree):
    return leading(
      jnp.moveaxis(tree["layers"]["w_lora_a"], 1, 0), jnp.moveaxis(tree["layers"]["w_lora_b"], 1, 0)
    )

  chex.assert_trees_all_close(back(got_updates), want_updates, rtol=1e-5, atol=1e-7)
  # Factor-shaped state (momentum) stays in the leaf's own layout.
  got_momentum = optax.tree_utils.tree_get(got_state, "momentum")
  assert got_momentum["layers"]["w_lora_a"].shape == (16, 3, 4)
  chex.assert_trees_all_close(
    back(got_momentum), optax.tree_utils.tree_get(want_state, "momentum"), rtol=1e-5, atol=1e-7
  )
  # Second moments are per layer, (L, d_in) / (L, d_out), in both layouts.
  rows, cols = ap.second_moments(got_state, scan(a, b), pairing)
  want_rows, want_cols = ap.second_moments(want_state, leading(a, b))
  assert rows["layers"]["w_lora_a"].shape == (3, 16)
  chex.assert_trees_all_close(
    rows["layers"]["w_lora_a"], want_rows["layers"]["w_lora_a"], rtol=1e-5
  )
  chex.assert_trees_all_close(
    cols["layers"]["w_lora_b"], want_cols["layers"]["w_lora_b"], rtol=1e-5
  )
  # Undeclared, the same shapes are refused rather than read as one matrix.
  with pytest.raises(ValueError, match="fit several layouts"):
    ap.adaprelora(1e-2).init(scan(a, b))


def _nd_params():
  """qwix layouts (attn_vec, kv, MoE) and a MaxText scanned pair."""
  z = jnp.zeros
  return {
    "attn_vec": {"w_lora_a": z((4, 8, 4)), "w_lora_b": z((4, 16))},
    "kv": {"w_lora_a": z((16, 4)), "w_lora_b": z((4, 2, 4, 8))},
    "moe": {"w_lora_a": z((2, 16, 4)), "w_lora_b": z((4, 32))},
    "scan": {"kernel_lora_a": z((16, 3, 4)), "kernel_lora_b": z((4, 3, 24))},
  }


_ND_SPECS = {
  "attn_vec": {"w_lora_a": P("tp", None, None), "w_lora_b": P(None, "fsdp")},
  "kv": {"w_lora_a": P("fsdp", None), "w_lora_b": P(None, None, "tp", None)},
  "moe": {"w_lora_a": P(None, "fsdp", None), "w_lora_b": P(None, "tp")},
  "scan": {"kernel_lora_a": P("fsdp", None, None), "kernel_lora_b": P(None, None, "tp")},
}

_SCAN = {"scan/kernel": Dims(a_batch_axes=(1,), b_batch_axes=(1,))}


def _group_entry(params, pairing, entry, name):
  groups = ap.plan_pairs(params, pairing).groups
  (index,) = [i for i, group in enumerate(groups) if group.members[0].name.split("/")[0] == name]
  return entry[index]


@pytest.mark.parametrize("sharded", [False, True], ids=["annotated", "sharded_pairing"])
def test_state_shardings_follow_nd_factor_axes(sharded):
  params = _nd_params()
  pairing = pairing_lib.annotate_pairing(dimension_numbers=_SCAN)
  if sharded:
    pairing = sharding.sharded_pairing(_ND_SPECS, pairing)
  tx = ap.scale_by_adaprelora(b1=0.9, pairing=pairing)
  state = sharding.state_shardings(tx, params, _ND_SPECS, pairing=pairing)

  def rows(name):
    return _group_entry(params, pairing, state.pairs.row_second_moment, name)

  def cols(name):
    return _group_entry(params, pairing, state.pairs.col_second_moment, name)

  # A flattened d_in / d_out is laid out like its sharded axis.
  assert rows("attn_vec") == P(None, "tp") and cols("attn_vec") == P(None, "fsdp")
  assert cols("kv") == P(None, "tp")
  assert rows("moe") == P(None, "fsdp")
  # Scanned layers: (pairs, L, d) with the layer axis as lora_a's axis 1.
  assert rows("scan") == P(None, None, "fsdp") and cols("scan") == P(None, None, "tp")
  # Factor-shaped state keeps the leaf layout and its sharding.
  assert state.pairs.momentum["kv"]["w_lora_b"] == P(None, None, "tp", None)
  assert state.pairs.momentum["scan"]["kernel_lora_a"] == P("fsdp", None, None)
  # sharded_pairing flattens the sharded axis first (N before C), so the
  # flattened factor is a block of devices' shards.
  (kv,) = [pair for pair in ap.plan_pairs(params, pairing).pairs if pair.name == "kv/w"]
  assert kv.dimension_numbers.b_out_axes == ((2, 1, 3) if sharded else (1, 2, 3))
  (moe,) = [pair for pair in ap.plan_pairs(params, pairing).pairs if pair.name == "moe/w"]
  assert moe.dimension_numbers.a_in_axes == ((1, 0) if sharded else (0, 1))


def test_full_lora_pro_state_on_nd_factors_is_sharded_like_both_factors():
  """(d_in, d_out) state of flattened N-D factors (stand-in sizes are
  products of the axes' sizes: they must stay distinct and in range)."""
  params = _nd_params()
  pairing = sharding.sharded_pairing(
    _ND_SPECS, pairing_lib.annotate_pairing(dimension_numbers=_SCAN)
  )
  tx = ap.lora_pro(1e-3, mode="full", pairing=pairing)
  specs = sharding.state_shardings(tx, params, _ND_SPECS, pairing=pairing)
  abstract = jax.eval_shape(tx.init, params)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  found = {
    leaf.shape: spec for leaf, spec in zip(jax.tree.leaves(abstract), spec_leaves, strict=True)
  }
  assert found[(16, 64)] == P("fsdp", "tp")  # kv: d_in 16, d_out 2·4·8
  assert found[(32, 16)] == P("tp", "fsdp")  # attn_vec: d_in 4·8
  assert found[(3, 16, 24)] == P(None, "fsdp", "tp")  # scanned: per layer


def _scaled_pair(key, scale, d_in=12, rank=3, d_out=10):
  """A pair of the map x·(scale·a·b) and its factor gradients for one G."""
  keys = jax.random.split(key, 3)
  a = jax.random.normal(keys[0], (d_in, rank))
  b = jax.random.normal(keys[1], (rank, d_out))
  g = jax.random.normal(keys[2], (d_in, d_out))
  params = {"w": {"lora_a": a, "lora_b": b}}
  grads = {"w": {"lora_a": scale * g @ b.T, "lora_b": scale * a.T @ g}}
  return params, grads


def _weight_step(tx, params, grads, scale):
  updates, state = tx.update(grads, tx.init(params), params)
  a, b = params["w"]["lora_a"], params["w"]["lora_b"]
  step = scale * (updates["w"]["lora_a"] @ b + a @ updates["w"]["lora_b"])
  return step, state


@pytest.mark.parametrize("clipping", [None, 1e-3], ids=["unclipped", "clipped"])
def test_lora_scale_makes_the_weight_step_independent_of_alpha(clipping):
  steps = {}
  for scale in (1.0, 4.0):
    params, grads = _scaled_pair(jax.random.key(0), scale)
    tx = ap.scale_by_adaprelora(clipping_threshold=clipping, lora_scale=scale)
    steps[scale], state = _weight_step(tx, params, grads, scale)
    # The statistics are those of G itself whatever the scale.
    rows, _ = ap.second_moments(state, params)
    steps[scale, "rows"] = rows["w"]["lora_a"]
    # Without lora_scale the weight-space step is ``scale`` times larger.
    unscaled, _ = _weight_step(
      ap.scale_by_adaprelora(clipping_threshold=clipping), params, grads, scale
    )
    steps[scale, "unscaled"] = unscaled
  np.testing.assert_allclose(steps[4.0], steps[1.0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(steps[4.0, "rows"], steps[1.0, "rows"], rtol=1e-5)
  np.testing.assert_allclose(steps[4.0, "unscaled"], 4.0 * steps[1.0], rtol=1e-5, atol=1e-6)


def test_per_pair_scale_from_the_pairing_equals_lora_scale():
  params, grads = _scaled_pair(jax.random.key(1), 2.0)
  by_argument, _ = _weight_step(ap.scale_by_adaprelora(lora_scale=2.0, b1=0.9), params, grads, 2.0)
  pairing = pairing_lib.annotate_pairing(scale={"w": 2.0})
  by_pairing, _ = _weight_step(ap.scale_by_adaprelora(pairing=pairing, b1=0.9), params, grads, 2.0)
  np.testing.assert_allclose(by_pairing, by_argument, rtol=1e-6)
  # Both multiply: 2 from the pairing and 0.5 from the argument is s = 1.
  both, _ = _weight_step(
    ap.scale_by_adaprelora(pairing=pairing, lora_scale=0.5), params, grads, 1.0
  )
  unit, _ = _weight_step(ap.scale_by_adaprelora(), params, grads, 1.0)
  np.testing.assert_allclose(both, unit, rtol=1e-5, atol=1e-7)
  # Under inject_hyperparams the scale is a traced hyperparameter.
  tx = optax.inject_hyperparams(ap.adaprelora)(learning_rate=-1.0, lora_scale=2.0)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert float(state.hyperparams["lora_scale"]) == 2.0
  a, b = params["w"]["lora_a"], params["w"]["lora_b"]
  injected = 2.0 * (updates["w"]["lora_a"] @ b + a @ updates["w"]["lora_b"])
  np.testing.assert_allclose(injected, by_argument, rtol=1e-5, atol=1e-6)


def test_bad_scales_are_rejected():
  params, _ = _scaled_pair(jax.random.key(0), 1.0)
  with pytest.raises(ValueError, match="lora_scale must be > 0"):
    ap.adaprelora(1e-2, lora_scale=0.0)
  pairing = pairing_lib.annotate_pairing(scale=lambda name: -1.0)
  with pytest.raises(ValueError, match="scale of LoRA pair 'w' must be > 0"):
    ap.plan_pairs(params, pairing)
