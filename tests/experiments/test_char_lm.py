"""Tests of the character LM and of its committed Shakespeare checkpoint."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import adaprelora_jax
from experiments import assets
from experiments import data
from experiments import pretrain_char_lm
from experiments import pretraining
from experiments.models import char_lm
from experiments.models.layers import LoRAConfig

TINY = char_lm.CharLMConfig(
  vocab_size=85, features=16, num_layers=2, num_heads=2, hidden_features=32, max_length=16
)


@pytest.fixture(scope="module")
def pretrained() -> tuple[char_lm.CharLM, str]:
  return char_lm.load(assets.char_lm_checkpoint(), rngs=nnx.Rngs(0))


def test_checkpoint_is_far_better_than_unigram(pretrained):
  model, chars = pretrained
  corpus = data.shakespeare_chars()
  assert chars == corpus.vocab.chars
  windows = data.lm_eval_windows(corpus.test, model.config.max_length)
  # A fixed slice of 16k validation characters from several works.
  sample = windows[:: len(windows) // 128][:128]
  bpc = char_lm.bits_per_char(model, sample)
  frequencies = np.bincount(corpus.train, minlength=corpus.vocab.size)
  frequencies = frequencies[frequencies > 0] / corpus.train.size
  unigram_bits = -np.sum(frequencies * np.log2(frequencies))
  assert unigram_bits > 4.5
  assert 1.0 < bpc < 2.6


def test_checkpoint_record_matches_weights_and_current_data(pretrained):
  model, _ = pretrained
  record = json.loads(assets.char_lm_checkpoint().with_suffix(".json").read_text())
  assert record["model"] == model.config.__dict__
  # The data pipeline still produces exactly what the model was trained on.
  assert record["data"]["sha256"] == data.shakespeare_chars().sha256()
  assert record["final_val_bpc"] < 2.6


def test_attention_is_causal():
  model = char_lm.CharLM(TINY, rngs=nnx.Rngs(0))
  tokens = jnp.arange(16)[None] % 85
  logits = model(tokens)[0]
  changed = model(tokens.at[0, 10].set(7))[0]
  np.testing.assert_array_equal(logits[:10], changed[:10])
  assert not np.allclose(logits[10:], changed[10:])


@pytest.mark.parametrize("layer_class", [nnx.LoRALinear, adaprelora_jax.nn.LoRALinear])
def test_save_load_round_trip_with_adapters(tmp_path, layer_class):
  model = char_lm.CharLM(TINY, rngs=nnx.Rngs(0))
  path = tmp_path / "tiny.npz"
  char_lm.save(model, path, vocab_chars="abc")
  lora = LoRAConfig(targets=("k", "o", "ffn_in"), rank=2, layer_class=layer_class, blocks=(1,))
  loaded, chars = char_lm.load(path, lora=lora, rngs=nnx.Rngs(1))
  assert chars == "abc" and loaded.config == TINY
  tokens = jnp.arange(32).reshape(2, 16) % 85
  np.testing.assert_array_equal(loaded(tokens), model(tokens))
  adapted = {
    "/".join(map(str, key[:-2])) for key, _ in nnx.to_flat_state(nnx.state(loaded, nnx.LoRAParam))
  }
  assert adapted == {"blocks/1/attention/k", "blocks/1/attention/o", "blocks/1/ffn/ffn_in"}
  # Adapters are never written into a checkpoint of base weights.
  char_lm.save(loaded, tmp_path / "again.npz", vocab_chars="abc")
  with np.load(tmp_path / "again.npz") as saved, np.load(path) as original:
    assert set(saved) == set(original)


def test_load_rejects_a_mismatched_checkpoint(tmp_path):
  path = tmp_path / "tiny.npz"
  char_lm.save(char_lm.CharLM(TINY, rngs=nnx.Rngs(0)), path, vocab_chars="abc")
  with np.load(path) as saved:
    arrays = dict(saved)
  del arrays["unembed/bias"]
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="unembed/bias"):
    char_lm.load(path, rngs=nnx.Rngs(0))


def test_pretraining_is_seeded_and_writes_its_record(tmp_path):
  config = pretraining.PretrainConfig(steps=3, batch_size=2, warmup_steps=1, eval_every=3)
  records = [pretrain_char_lm.pretrain(TINY, config, tmp_path / f"{i}.npz") for i in range(2)]
  assert records[0]["final_val_bpc"] == records[1]["final_val_bpc"]
  assert json.loads((tmp_path / "0.json").read_text())["training"]["steps"] == 3
  with np.load(tmp_path / "0.npz") as a, np.load(tmp_path / "1.npz") as b:
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
