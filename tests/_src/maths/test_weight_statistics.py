"""adaprelora_jax._src.maths.weight_statistics against dense float64 weight gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from adaprelora_jax._src.maths import weight_statistics as ws


def _dense_statistics(x, delta, layout, sizes):
  """Row/column means of G² with G = ∂L/∂W formed densely (numpy float64):
  W's axes are lead + in + out, G = einsum(x, δ) over the tokens, flattened
  to (*lead, d_in, d_out)."""
  weight = layout.lead + layout.in_chars + layout.out_chars
  grad_w = np.einsum(f"{layout.inputs},{layout.outputs}->{weight}", x, delta)
  lead = tuple(sizes[c] for c in layout.lead)
  d_in = int(np.prod([sizes[c] for c in layout.in_chars]))
  flat = grad_w.reshape(*lead, d_in, -1)
  return np.mean(flat**2, axis=-1), np.mean(flat**2, axis=-2)


LAYOUTS = {
  # nnx.Linear on (B, T, D): tokens B·T.
  "linear": ws.EinsumWeightLayout("btd", "btf", "", "d", "f"),
  # Gemma's q, kv and attention-output einsums (N-D factors).
  "q": ws.EinsumWeightLayout("BTD", "BTNH", "", "D", "NH"),
  "kv": ws.EinsumWeightLayout("BTD", "CBTNH", "", "D", "CNH"),
  "attn_vec": ws.EinsumWeightLayout("BTNH", "BTD", "", "NH", "D"),
  # MoE: the expert axis is a block of d_in.
  "moe": ws.EinsumWeightLayout("EBD", "EBF", "", "ED", "F"),
  # Batched dot_general (stacked layers): L is the pair's batch axis.
  "batched": ws.EinsumWeightLayout("LTD", "LTF", "L", "D", "F"),
  # An input axis the op sums away, and in-axes out of weight order.
  "summed": ws.EinsumWeightLayout("BSD", "BF", "", "D", "F"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 5, 40], ids=["gram", "gram5", "dense"])
def test_matches_dense_gradient(name, tokens):
  layout = LAYOUTS[name]
  rng = np.random.default_rng(len(name) + tokens)
  chars = set(layout.inputs + layout.outputs)
  sizes = {c: int(rng.integers(2, 5)) for c in chars}
  for c in "BbTt":
    if c in sizes:
      sizes[c] = tokens
  x = rng.normal(size=[sizes[c] for c in layout.inputs])
  delta = rng.normal(size=[sizes[c] for c in layout.outputs])
  want_rows, want_cols = _dense_statistics(x, delta, layout, sizes)
  with jax.enable_x64(True):
    rows, cols = ws.einsum_weight_statistics(jnp.asarray(x), jnp.asarray(delta), layout)
  np.testing.assert_allclose(np.asarray(rows), want_rows, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(cols), want_cols, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
  tokens=st.integers(1, 12),
  in_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
  out_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=2),
  lead=st.integers(0, 3),
  block=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_property_random_layouts(tokens, in_sizes, out_sizes, lead, block, seed):
  """Random einsums: any number of in/out axes, an optional block (expert)
  axis and an optional lead (layer) axis, both token paths."""
  letters = iter("abcdefghijkmn")
  in_chars = "".join(next(letters) for _ in in_sizes)
  out_chars = "".join(next(letters) for _ in out_sizes)
  sizes = dict(zip(in_chars + out_chars, in_sizes + out_sizes, strict=True))
  sizes["t"] = tokens
  lead_chars = "L" if lead else ""
  if lead:
    sizes["L"] = lead
  inputs, outputs = lead_chars + "t" + in_chars, lead_chars + "t" + out_chars
  if block:
    # The first in-axis also indexes the output: a block of G.
    outputs = in_chars[0] + outputs
  layout = ws.EinsumWeightLayout(inputs, outputs, lead_chars, in_chars, out_chars)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=[sizes[c] for c in inputs])
  delta = rng.normal(size=[sizes[c] for c in outputs])
  want_rows, want_cols = _dense_statistics(x, delta, layout, sizes)
  with jax.enable_x64(True):
    rows, cols = ws.einsum_weight_statistics(jnp.asarray(x), jnp.asarray(delta), layout)
  np.testing.assert_allclose(np.asarray(rows), want_rows, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(np.asarray(cols), want_cols, rtol=1e-9, atol=1e-12)


def test_statistics_are_float32_for_bfloat16_inputs():
  x = jnp.ones((4, 3), jnp.bfloat16)
  layout = ws.EinsumWeightLayout("td", "tf", "", "d", "f")
  rows, cols = ws.einsum_weight_statistics(x, x, layout)
  assert rows.dtype == cols.dtype == jnp.float32


@pytest.mark.parametrize(
  "layout,match",
  [
    (ws.EinsumWeightLayout("BD", "BF", "", "DD", "F"), "repeated"),
    (ws.EinsumWeightLayout("BD", "BF", "", "X", "F"), "'X' is not in the input"),
    (ws.EinsumWeightLayout("BD", "BF", "", "D", "FG"), "'G' must be in the output only"),
    (ws.EinsumWeightLayout("BD", "F", "B", "D", "F"), "batch axis 'B'"),
    (ws.EinsumWeightLayout("BD", "BFZ", "", "D", "F"), "'Z' is in neither"),
  ],
)
def test_unreadable_layouts_are_named(layout, match):
  with pytest.raises(ValueError, match=match):
    ws.check_einsum_weight_layout(layout)


def test_gradient_square_sums_paths_agree():
  """The Gram path and the dense path give the same sums (float64)."""
  rng = np.random.default_rng(0)
  for tokens, d_in, d_out in itertools.product([2, 30], [3, 17], [4, 19]):
    x, delta = rng.normal(size=(tokens, d_in)), rng.normal(size=(tokens, d_out))
    grad_w = x.T @ delta
    with jax.enable_x64(True):
      rows, cols = ws.gradient_square_sums(jnp.asarray(x), jnp.asarray(delta))
    np.testing.assert_allclose(np.asarray(rows), np.sum(grad_w**2, 1), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(cols), np.sum(grad_w**2, 0), rtol=1e-10)


@pytest.mark.parametrize("name", ["linear", "q", "moe", "batched"])
@pytest.mark.parametrize("groups", [2, 3])
def test_groups_give_the_mean_of_rescaled_per_group_statistics(name, groups):
  """Per-shard statistics: the tokens' major axis split into ``groups``
  contiguous groups, each group's G_k rescaled to the batch (groups·G_k),
  their statistics averaged."""
  layout = LAYOUTS[name]
  rng = np.random.default_rng(groups)
  sizes = {c: int(rng.integers(2, 4)) for c in set(layout.inputs + layout.outputs)}
  token_chars = [c for c in layout.inputs if c in layout.outputs and c not in layout.lead]
  token_chars = [c for c in token_chars if c not in layout.in_chars]
  sizes[token_chars[0]] = 2 * groups  # the major token axis splits evenly
  x = rng.normal(size=[sizes[c] for c in layout.inputs])
  delta = rng.normal(size=[sizes[c] for c in layout.outputs])
  axis_x, axis_d = layout.inputs.index(token_chars[0]), layout.outputs.index(token_chars[0])
  parts = [
    _dense_statistics(groups * xk, dk, layout, {**sizes, token_chars[0]: 2})
    for xk, dk in zip(
      np.split(x, groups, axis=axis_x), np.split(delta, groups, axis=axis_d), strict=True
    )
  ]
  want_rows = np.mean([rows for rows, _ in parts], axis=0)
  want_cols = np.mean([cols for _, cols in parts], axis=0)
  with jax.enable_x64(True):
    rows, cols = ws.einsum_weight_statistics(
      jnp.asarray(x), jnp.asarray(delta), layout, groups=groups
    )
  np.testing.assert_allclose(np.asarray(rows), want_rows, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(cols), want_cols, rtol=1e-10, atol=1e-12)
  # One group is the global statistic, and more groups are not.
  global_rows, _ = _dense_statistics(x, delta, layout, sizes)
  assert not np.allclose(np.asarray(rows), global_rows, rtol=1e-3)


def test_tokens_that_do_not_split_are_an_error():
  layout = ws.EinsumWeightLayout("td", "tf", "", "d", "f")
  with pytest.raises(ValueError, match="5 tokens do not split into 2 groups"):
    ws.einsum_weight_statistics(jnp.ones((5, 3)), jnp.ones((5, 4)), layout, groups=2)
