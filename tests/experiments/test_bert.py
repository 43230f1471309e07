"""Tests of :mod:`experiments.models.bert` against PyTorch reference outputs."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaprelora_jax
from experiments import assets
from experiments.models import bert
from experiments.models.layers import PROJECTIONS
from experiments.models.layers import LoRAConfig
from experiments.models.layers import masked_mean

# ``transformers.BertModel`` outputs on all-MiniLM-L6-v2 for 5 sentences
# padded to length 32 (see the fixture's keys).
FIXTURE = Path(__file__).parents[1] / "fixtures" / "minilm_l6_reference.npz"
LAYER_CLASSES = [nnx.LoRALinear, adaprelora_jax.nn.LoRALinear]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
  with np.load(FIXTURE) as saved:
    return dict(saved)


@pytest.fixture(scope="module")
def batch(reference) -> dict[str, jax.Array]:
  return {
    name: jnp.asarray(reference[name]) for name in ("input_ids", "attention_mask", "token_type_ids")
  }


@pytest.fixture(scope="module")
def encoder() -> bert.BertEncoder:
  return bert.BertEncoder.pretrained(assets.minilm_dir(), rngs=nnx.Rngs(0))


def test_tokenizer_reproduces_reference_inputs(reference):
  tokenizer = bert.load_tokenizer(assets.minilm_dir(), length=32)
  tokens = bert.tokenize(tokenizer, [str(s) for s in reference["sentences"]])
  for name, ids in tokens.items():
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, reference[name])


def test_forward_matches_pytorch(encoder, reference, batch):
  hidden = encoder(**batch)
  # Padded positions are never read downstream, but match too.
  np.testing.assert_allclose(hidden, reference["last_hidden_state"], atol=1e-4)
  valid = reference["attention_mask"].astype(bool)
  np.testing.assert_allclose(
    np.asarray(hidden)[valid], reference["last_hidden_state"][valid], atol=1e-5
  )
  pooled = masked_mean(hidden, batch["attention_mask"])
  embedding = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(embedding, reference["sentence_embedding"], atol=1e-6)


@pytest.mark.parametrize("layer_class", LAYER_CLASSES)
def test_fresh_adapters_leave_outputs_unchanged(encoder, batch, layer_class):
  lora = LoRAConfig(targets=PROJECTIONS, rank=4, layer_class=layer_class)
  adapted = bert.BertEncoder.pretrained(assets.minilm_dir(), lora=lora, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(adapted(**batch), encoder(**batch))


def _names(state: nnx.State) -> set[str]:
  return {"/".join(map(str, key)) for key, _ in nnx.to_flat_state(state)}


@pytest.mark.parametrize("layer_class", LAYER_CLASSES)
def test_only_requested_adapters_and_head_are_trained(batch, layer_class):
  lora = LoRAConfig(targets=("q", "ffn_out"), rank=2, layer_class=layer_class, blocks=(4, 5))
  model = bert.BertClassifier.pretrained(
    assets.minilm_dir(), num_classes=3, lora=lora, rngs=nnx.Rngs(0)
  )
  paths = {"q": "attention/q", "ffn_out": "ffn/ffn_out"}
  leaves = ["lora_a", "lora_b"]
  if layer_class is adaprelora_jax.nn.LoRALinear:
    leaves += ["grad_sq_rows", "grad_sq_cols"]
  expected = {
    f"encoder/blocks/{block}/{paths[target]}/lora/{leaf}"
    for block in (4, 5)
    for target in paths
    for leaf in leaves
  }
  assert _names(nnx.state(model, nnx.LoRAParam)) == expected
  assert _names(nnx.state(model, bert.HeadParam)) == {"head/kernel", "head/bias"}

  frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  assert len(jax.tree.leaves(frozen)) == 3 + 2 + 6 * 16  # embeddings, norm, blocks
  frozen_before = jax.tree.map(np.asarray, frozen)
  trainable_before = jax.tree.map(np.asarray, nnx.state(model, bert.TRAINABLE))

  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=bert.TRAINABLE)
  labels = jnp.arange(5) % 3

  def loss_fn(m):
    logits = m(batch["input_ids"], batch["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, bert.TRAINABLE))(model)
  assert _names(grads) == expected | {"head/kernel", "head/bias"}
  optimizer.update(model, grads)

  jax.tree.map(
    np.testing.assert_array_equal,
    frozen_before,
    jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))),
  )
  after = nnx.to_flat_state(nnx.state(model, bert.TRAINABLE))
  changed = {
    "/".join(map(str, key))
    for (key, new), (_, old) in zip(after, nnx.to_flat_state(trainable_before), strict=True)
    if not np.array_equal(np.asarray(new), old)
  }
  # b factors move (their gradient is nonzero since a != 0); a factors do
  # not move on the first step (their gradient is proportional to b = 0).
  assert {"head/kernel", "head/bias"} <= changed
  assert {f"encoder/blocks/{b}/{p}/lora/lora_b" for b in (4, 5) for p in paths.values()} <= changed
  assert not any(name.endswith("lora_a") for name in changed)


def test_cached_lower_blocks_give_the_same_logits(batch):
  lora = LoRAConfig(targets=("q", "v"), rank=4, blocks=(4, 5))
  model = bert.BertClassifier.pretrained(
    assets.minilm_dir(), num_classes=5, lora=lora, rngs=nnx.Rngs(0)
  )
  # Make the adapters matter: b = 0 would hide a wrong cache boundary.
  for block in model.encoder.blocks[4:]:
    for layer in (block.attention.q, block.attention.v):
      layer.lora.lora_b[...] = jnp.full(layer.lora.lora_b.shape, 0.05)
  start = lora.first_adapted_block(len(model.encoder.blocks))
  assert start == 4
  encoder = model.encoder
  cached = encoder.encode(
    encoder.embeddings(batch["input_ids"], batch["token_type_ids"]),
    batch["attention_mask"],
    stop=start,
  )
  np.testing.assert_allclose(
    model.from_hidden(cached, batch["attention_mask"], start), model(**batch), atol=1e-5
  )


def test_lora_config_validation():
  with pytest.raises(ValueError, match="unknown projections"):
    LoRAConfig(targets=("query",))
  with pytest.raises(ValueError, match="rank"):
    LoRAConfig(targets=("q",), rank=0)
  config = LoRAConfig(targets=["v", "q"], blocks=[3, 5])
  assert config == LoRAConfig(targets=("q", "v"), blocks=(5, 3))
  assert config.applies(3, "q") and not config.applies(4, "q")
  assert not config.applies(3, "k")
  assert config.first_adapted_block(6) == 3
  assert LoRAConfig(targets=("q",)).first_adapted_block(6) == 0
  assert LoRAConfig(targets=()).first_adapted_block(6) == 6
