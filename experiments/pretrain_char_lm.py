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
"""Pretrains the character transformer on Shakespeare (the LoRA base model).

No pretrained decoder is installable offline, so the project makes its own:
full-parameter AdamW with linear warm-up and cosine decay
(:mod:`experiments.pretraining`), fixed seed, on the 42 Shakespeare works
(:func:`experiments.data.shakespeare_chars`).
Writes the weights (:func:`experiments.models.char_lm.save`) and a JSON
record (config, seed, steps, validation bits per character, sha256 of the
data) next to them. The defaults regenerate the committed checkpoint
(2,000 steps of 32 x 128 characters, final validation 2.03 bits/char; 28
minutes on 2 CPU cores shared with other jobs, about 0.5 s/step when they
are idle); with the same library versions the result is the same::

  python -m experiments.pretrain_char_lm
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from experiments import assets
from experiments import data
from experiments.models import char_lm
from experiments.pretraining import PretrainConfig
from experiments.pretraining import pretrain_optimizer


@nnx.jit
def _train_step(model: char_lm.CharLM, optimizer: nnx.Optimizer, windows: jax.Array) -> jax.Array:
  def loss_fn(m):
    return char_lm.next_token_nats(m, windows).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def pretrain(model_config: char_lm.CharLMConfig, config: PretrainConfig, output: Path) -> dict:
  """Trains, evaluates and saves; returns the JSON record written."""
  corpus = data.shakespeare_chars()
  if model_config.vocab_size != corpus.vocab.size:
    raise ValueError(f"vocab_size must be {corpus.vocab.size}")
  val_windows = data.lm_eval_windows(corpus.test, model_config.max_length)
  model = char_lm.CharLM(model_config, rngs=nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, pretrain_optimizer(config), wrt=nnx.Param)
  batches = data.lm_batches(
    corpus.train, config.batch_size, model_config.max_length, seed=config.seed
  )
  start, losses, history = time.perf_counter(), [], []
  for step in range(1, config.steps + 1):
    losses.append(float(_train_step(model, optimizer, next(batches))))
    if step % config.eval_every == 0 or step == config.steps:
      val_bpc = char_lm.bits_per_char(model, val_windows)
      train_bpc = float(np.mean(losses[-config.eval_every :]) / np.log(2))
      history.append(
        {
          "step": step,
          "train_bpc": round(train_bpc, 4),
          "val_bpc": round(val_bpc, 4),
          "seconds": round(time.perf_counter() - start, 1),
        }
      )
      print(json.dumps(history[-1]), flush=True)
  char_lm.save(model, output, corpus.vocab.chars)
  record = {
    "model": dataclasses.asdict(model_config),
    "training": dataclasses.asdict(config),
    "final_val_bpc": history[-1]["val_bpc"],
    "history": history,
    "data": {
      "corpus": "experiments.data.shakespeare_chars()",
      "train_chars": int(corpus.train.size),
      "val_chars": int(corpus.test.size),
      "sha256": corpus.sha256(),
    },
    "seconds": history[-1]["seconds"],
    "versions": {
      name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy")
    },
  }
  output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
  return record


def main() -> None:
  defaults_model = char_lm.CharLMConfig(vocab_size=0)
  defaults = PretrainConfig()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", type=Path, default=assets.CHAR_LM_CHECKPOINT)
  for field in dataclasses.fields(char_lm.CharLMConfig):
    if field.name != "vocab_size":
      parser.add_argument(f"--{field.name}", type=int, default=getattr(defaults_model, field.name))
  for field in dataclasses.fields(PretrainConfig):
    value = getattr(defaults, field.name)
    parser.add_argument(f"--{field.name}", type=type(value), default=value)
  args = vars(parser.parse_args())
  output = args.pop("output")
  model_config = char_lm.CharLMConfig(
    vocab_size=data.char_vocab().size,
    **{
      f.name: args[f.name]
      for f in dataclasses.fields(char_lm.CharLMConfig)
      if f.name != "vocab_size"
    },
  )
  config = PretrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(PretrainConfig)})
  output.parent.mkdir(parents=True, exist_ok=True)
  pretrain(model_config, config, output)


if __name__ == "__main__":
  main()
