"""Pairing: finding LoRA pairs in pytrees and rejecting bad ones by path."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import adaprelora_jax as ap
from adaprelora_jax import nn
from adaprelora_jax import pairing as pairing_lib
from adaprelora_jax._src.discovery import plan as plan_lib


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.attention = nnx.LoRALinear(8, 8, lora_rank=2, rngs=rngs)
    self.ffn = nn.LoRALinear(8, 16, lora_rank=4, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)


def test_finds_pairs_in_nnx_state_with_nested_modules():
  model = _Block(nnx.Rngs(0))
  state = nnx.state(model, nnx.LoRAParam)
  plan = plan_lib.plan_pairs(state)
  names = sorted(pair.name for pair in plan.pairs)
  assert names == ["attention/lora", "ffn/lora"]
  ffn = next(pair for pair in plan.pairs if pair.name == "ffn/lora")
  assert (ffn.d_in, ffn.rank, ffn.d_out) == (8, 4, 16)
  assert ffn.has_statistics and ffn.a_path == "ffn/lora/lora_a"
  attention = next(pair for pair in plan.pairs if pair.name == "attention/lora")
  assert not attention.has_statistics
  assert plan.other_indices == ()
  # The pure (array) form that nnx.Optimizer hands to optax pairs the same.
  assert len(plan_lib.plan_pairs(nnx.as_pure(state)).pairs) == 2


def test_whole_model_state_puts_other_params_in_the_fallback():
  model = _Block(nnx.Rngs(0))
  plan = plan_lib.plan_pairs(nnx.state(model, nnx.Param))
  other = {plan.paths[i] for i in plan.other_indices}
  assert {"attention/kernel", "attention/bias", "norm/scale"} <= other


def test_stacked_layers_and_plain_dicts():
  params = {"layers": {"q": {"lora_a": jnp.zeros((6, 32, 4)), "lora_b": jnp.zeros((6, 4, 32))}}}
  plan = plan_lib.plan_pairs(params)
  (pair,) = plan.pairs
  assert pair.lead_shape == (6,) and plan.groups[0].size == 6


def test_groups_split_by_shape_dtype_and_statistics():
  params = {
    "a": {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 4))},
    "b": {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 4))},
    "c": {"lora_a": jnp.zeros((8, 2), jnp.bfloat16), "lora_b": jnp.zeros((2, 4), jnp.bfloat16)},
    "d": {"lora_a": jnp.zeros((8, 3)), "lora_b": jnp.zeros((3, 4))},
    "e": {
      "lora_a": jnp.zeros((8, 2)),
      "lora_b": jnp.zeros((2, 4)),
      "grad_sq_rows": jnp.zeros(8),
      "grad_sq_cols": jnp.zeros(4),
    },
  }
  plan = plan_lib.plan_pairs(params)
  assert sorted(len(group.members) for group in plan.groups) == [1, 1, 1, 2]
  # Ignored statistics leaves still split the groups (as in every mode), so
  # that stacked state has one layout whatever ``statistics`` says.
  tangent = plan_lib.plan_pairs(params, statistics="tangent")
  assert [[pair.name for pair in group.members] for group in tangent.groups] == [
    [pair.name for pair in group.members] for group in plan.groups
  ]
  assert not any(group.exact_statistics for group in tangent.groups)


def test_groups_split_by_layout():
  """Pairs stack together only if their leaves report the same layout."""

  def pair():
    return {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 8))}

  params = {"q": pair(), "k": pair(), "o": pair()}
  layouts = {"q": "column", "k": "column", "o": "row"}

  def pairing(path, leaf):
    found = pairing_lib.nnx_pairing(path, leaf)
    return found and found._replace(layout=layouts[path[0]])

  plan = plan_lib.plan_pairs(params, pairing)
  assert sorted([pair.name for pair in group.members] for group in plan.groups) == [
    ["k", "q"],
    ["o"],
  ]

  # Every leaf of a pair counts: a pair whose b alone differs is split off.
  def one_leaf(path, leaf):
    return pairing_lib.nnx_pairing(path, leaf)._replace(layout=path == ("o", "lora_b"))

  assert len(plan_lib.plan_pairs(params, one_leaf).groups) == 2


def test_uniform_layout_check_names_both_pairs():
  def pair():
    return {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 8))}

  plan = plan_lib.plan_pairs({"q": pair(), "o": pair()})
  specs = {"o/lora_a": ("model", None)}
  layouts = [specs.get(path, (None, None)) for path in plan.paths]
  with pytest.raises(ValueError, match=r"'o/lora_a' and 'q/lora_a'.*\('model', None\)"):
    plan.check_uniform_layouts(layouts, "shardings")
  plan.check_uniform_layouts([(None, None)] * plan.num_leaves, "shardings")


def test_peft_flat_state_dict():
  params = {
    "model.layers.0.self_attn.q_proj.lora_A.default.weight": jnp.zeros((8, 64)),
    "model.layers.0.self_attn.q_proj.lora_B.default.weight": jnp.zeros((32, 8)),
    "model.layers.0.self_attn.q_proj.base_layer.weight": jnp.zeros((32, 64)),
  }
  plan = plan_lib.plan_pairs(params, "peft")
  (pair,) = plan.pairs
  assert (pair.d_in, pair.rank, pair.d_out, pair.transposed) == (64, 8, 32, True)
  assert [plan.paths[i] for i in plan.other_indices] == [
    "model.layers.0.self_attn.q_proj.base_layer.weight"
  ]


def test_custom_pairing_function():
  params = {"down": jnp.zeros((16, 2)), "up": jnp.zeros((2, 12)), "bias": jnp.zeros(12)}

  def pairing(path, leaf):
    del leaf
    roles = {"down": "a", "up": "b"}
    return ap.LoRARole("adapter", roles[path[-1]]) if path[-1] in roles else None

  plan = plan_lib.plan_pairs(params, pairing)
  assert plan.pairs[0].d_out == 12
  tx = optax.inject_hyperparams(ap.adaprelora, static_args=("pairing",))(
    learning_rate=0.1, pairing=pairing
  )
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert updates["bias"].shape == (12,)


@pytest.mark.parametrize(
  "params,match",
  [
    (
      {"layer": {"lora_a": jnp.zeros((4, 2))}},
      r"Unpaired LoRA factor 'layer/lora_a'.*no 'b' factor",
    ),
    (
      {"layer": {"lora_b": jnp.zeros((2, 4))}},
      r"Unpaired LoRA factor 'layer/lora_b'.*no 'a' factor",
    ),
    (
      {"layer": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((3, 5))}},
      r"rank mismatch between 'layer/lora_a' \(4, 2\) and 'layer/lora_b' \(3, 5\)",
    ),
    (
      {"layer": {"lora_a": jnp.zeros((4,)), "lora_b": jnp.zeros((2, 5))}},
      r"'layer/lora_a' has shape \(4,\)",
    ),
    (
      {"layer": {"lora_a": jnp.zeros((4, 2), jnp.int32), "lora_b": jnp.zeros((2, 5), jnp.int32)}},
      r"'layer/lora_a' has dtype int32",
    ),
    (
      {"layer": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 5), jnp.bfloat16)}},
      r"'layer/lora_a' is float32 but 'layer/lora_b' is bfloat16",
    ),
    # (3, 4, 2) with (2, 2, 5) would be a valid N-D layout (d_in 12, d_out 10).
    (
      {"layer": {"lora_a": jnp.zeros((3, 4, 2)), "lora_b": jnp.zeros((5, 2, 5))}},
      r"leading \(layer\) axes differ between 'layer/lora_a'",
    ),
    (
      {
        "layer": {
          "lora_a": jnp.zeros((4, 2)),
          "lora_b": jnp.zeros((2, 5)),
          "grad_sq_rows": jnp.zeros(4),
        }
      },
      r"statistics leaf 'layer/grad_sq_rows' has no partner",
    ),
    (
      {
        "layer": {
          "lora_a": jnp.zeros((4, 2)),
          "lora_b": jnp.zeros((2, 5)),
          "grad_sq_rows": jnp.zeros(5),
          "grad_sq_cols": jnp.zeros(5),
        }
      },
      r"'layer/grad_sq_rows' of pair 'layer' has shape \(5,\), expected \(4,\)",
    ),
    (
      {"layer": {"lora_a": [1.0, 2.0], "lora_b": jnp.zeros((2, 5))}},
      r"Unpaired LoRA factor 'layer/lora_b'",
    ),
    ({"kernel": jnp.zeros((4, 4))}, r"No LoRA pairs found.*'kernel'"),
  ],
)
def test_bad_trees_raise_with_the_path(params, match):
  with pytest.raises(ValueError, match=match):
    plan_lib.plan_pairs(params)
  # The optimizer reports the same error at init.
  with pytest.raises(ValueError, match=match):
    ap.adaprelora(1e-3).init(params)


def test_duplicate_roles_are_rejected():
  params = {
    "x.lora_A.w": jnp.zeros((2, 4)),
    "x.lora_B.w": jnp.zeros((4, 2)),
    "x": {"lora_A": {"w": jnp.zeros((2, 4))}},
  }
  with pytest.raises(ValueError, match="two 'a' leaves"):
    plan_lib.plan_pairs(params, "peft")


def test_pairing_returning_a_bad_role_is_rejected():
  with pytest.raises(ValueError, match="returned role 'c'"):
    plan_lib.plan_pairs({"w": jnp.zeros((2, 2))}, lambda path, leaf: ("p", "c"))


def test_mirror_and_masks_follow_the_params_structure():
  model = _Block(nnx.Rngs(0))
  state = nnx.state(model, nnx.LoRAParam)
  plan = plan_lib.plan_pairs(state)
  mirrored = plan.mirror(lambda pair, role: jnp.zeros(pair.d_in), roles=("a",))
  assert jax.tree.structure(plan.other_mask()) == jax.tree.structure(state)
  leaves = plan.leaves(mirrored)
  assert isinstance(leaves[plan.pairs[0].b_index], optax.MaskedNode)
