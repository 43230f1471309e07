"""Pretrains the flagship's Llama 3 (Tunix's class) on Shakespeare, over characters.

The base model of the flagship study (``experiments.tasks.flagship``):
``tunix.models.llama3.Llama3`` at 4 layers, d=256, 4 query / 2 key-value
heads of 64, SwiGLU 512 (2.4M parameters), trained from scratch with
full-parameter AdamW, warm-up and cosine decay (the schedule and clipping of
``experiments.pretrain_char_lm``: :mod:`experiments.pretraining`), fixed
seed, on the 42 Shakespeare works.

Tokenizer: characters (:func:`experiments.data.char_vocab`, 85 ids), not a
byte-level BPE. Under a 2-core budget the model is so small that its cost
per token is dominated by the projections, not by attention over the
128-token window, so BPE's 3-4x shorter sequences would buy little compute
per character while its vocabulary (thousands of ids) would make embedding
and head a large share of a 2.4M-parameter model and of LoRA's frozen
compute. Characters also make the metric exact -- bits per character is the
mean next-token loss over ln 2, with no bytes-per-token conversion -- and
reuse the data pipeline and held-out split of ``experiments.tasks.milton``,
so the two Milton studies are comparable. Milton characters that Shakespeare
never uses map to UNK, as there.

Writes float16 safetensors weights (:func:`experiments.models.llama.save`)
and a JSON record next to them: configs, seed, loss curve, validation bits
per character of the saved (float16) weights on the whole validation split,
wall time, sha256 of the data, library versions. The defaults regenerate the
committed checkpoint (1,000 steps of 16 x 128 characters, 2M characters seen;
validation 2.30 bits/char on all 1,952 validation windows; 16 minutes on 2
CPU cores shared with other jobs, 0.55 s/step when they were quiet; 4.8 MB);
with the same library versions the result is the same::

  python -m experiments.pretrain_llama
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
from tunix.utils import env_utils

from experiments import assets
from experiments import data
from experiments.models import llama
from experiments.pretraining import PretrainConfig
from experiments.pretraining import pretrain_optimizer

SEQ_LEN = 128
# The committed checkpoint's training run: 1,000 steps of 16 x 128 characters
# fit the ~15 minutes this study may spend on pretraining.
DEFAULTS = PretrainConfig(
  steps=1000, batch_size=16, warmup_steps=50, peak_learning_rate=2e-3, eval_every=100
)
# The curve is measured on a fixed, evenly spaced sample of validation windows;
# the final figure on all of them.
CURVE_WINDOWS = 256


@nnx.jit
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, windows: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(lambda m: llama.next_token_nats(m, windows).mean())(model)
  optimizer.update(model, grads)
  return loss


def _spaced(windows: np.ndarray, count: int) -> np.ndarray:
  return windows[np.linspace(0, len(windows) - 1, count).astype(int)]


def pretrain(size: llama.LlamaSize, config: PretrainConfig, output: Path) -> dict:
  """Trains, evaluates and saves; returns the JSON record written."""
  corpus = data.shakespeare_chars()
  if size.vocab_size != corpus.vocab.size:
    raise ValueError(f"vocab_size must be {corpus.vocab.size}")
  windows = data.lm_eval_windows(corpus.test, SEQ_LEN)
  # Whole batches of 32: drops at most 31 windows of the ~2,100.
  val_windows, curve_windows = windows[: len(windows) // 32 * 32], _spaced(windows, CURVE_WINDOWS)
  env_utils.setup_sharding_environment()
  with jax.set_mesh(llama.mesh()):
    model = llama.build(size, config.seed)
    optimizer = nnx.Optimizer(model, pretrain_optimizer(config), wrt=nnx.Param)
    batches = data.lm_batches(corpus.train, config.batch_size, SEQ_LEN, seed=config.seed)
    start, losses, history = time.perf_counter(), [], []
    for step in range(1, config.steps + 1):
      losses.append(float(_train_step(model, optimizer, next(batches))))
      if step % config.eval_every == 0 or step == config.steps:
        train_bpc = float(np.mean(losses[-config.eval_every :]) / np.log(2))
        history.append(
          {
            "step": step,
            "train_bpc": round(train_bpc, 4),
            "val_bpc": round(llama.bits_per_char(model, curve_windows), 4),
            "seconds": round(time.perf_counter() - start, 1),
          }
        )
        print(json.dumps(history[-1]), flush=True)
    seconds = time.perf_counter() - start
    llama.save(model, size, output, corpus.vocab.chars)
    saved, _, _ = llama.load(output)
    final_val_bpc = llama.bits_per_char(saved, val_windows)
  record = {
    "model": dataclasses.asdict(size),
    "architecture": "tunix.models.llama3.Llama3 (rope_theta 10000, norm_eps 1e-6)",
    "parameters": llama.parameter_count(saved),
    "training": dataclasses.asdict(config),
    "seq_len": SEQ_LEN,
    "final_val_bpc": round(final_val_bpc, 4),
    "final_val_windows": len(val_windows),
    "history": history,
    "train_loss": [round(loss, 4) for loss in losses],
    "data": {
      "corpus": "experiments.data.shakespeare_chars()",
      "train_chars": int(corpus.train.size),
      "val_chars": int(corpus.test.size),
      "sha256": corpus.sha256(),
    },
    "seconds": round(seconds, 1),
    "versions": {
      name: importlib.metadata.version(name)
      for name in ("jax", "jaxlib", "flax", "optax", "numpy", "google-tunix")
    },
  }
  output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
  return record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", type=Path, default=assets.LLAMA_CHECKPOINT)
  parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
  parser.add_argument("--steps", type=int, default=DEFAULTS.steps)
  args = parser.parse_args()
  args.output.parent.mkdir(parents=True, exist_ok=True)
  pretrain(
    llama.LlamaSize(vocab_size=data.char_vocab().size),
    dataclasses.replace(DEFAULTS, seed=args.seed, steps=args.steps),
    args.output,
  )


if __name__ == "__main__":
  main()
