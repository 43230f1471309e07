"""End-to-end train step (forward + backward + update) on pretrained MiniLM-L6 with LoRA.

docs/design.md §8: one process, identical inputs, warm-up, medians, every
figure a ratio to ``optax.adamw`` measured in the same run. The model is
all-MiniLM-L6-v2 (pretrained weights from ``experiments.assets``) with LoRA
rank 8 on all six projections of all six blocks (36 pairs) and a linear head
on the masked-mean pooled output; the loss is cross-entropy over 5 classes.
Every optimizer of ``experiments/optimizers.py`` runs; the ones with
``exact_statistics`` are built on ``adaprelora_jax.nn.LoRALinear`` layers
(exact row/column statistics of ``G²`` from the custom VJP), the others on
``flax.nnx.LoRALinear``. Token ids are drawn at random from the vocabulary with
a fixed seed (timing does not depend on the text; the weights are the real
ones).

All steps of one shape are compiled first and then timed in interleaved
rounds (each round runs every optimizer once), so that load drifting on a
shared machine hits every row alike; the medians over rounds are reported.

Besides the train step, the forward + backward alone (no update) is timed
for the two layer kinds at every shape and at a large-token shape
(``--large``), where the exact statistics' custom VJP forms ``G`` per layer
(docs/design.md §5: ``O(T d_in d_out)`` once ``T`` exceeds ``d_in d_out /
(d_in + d_out)``); its cost is reported as a ratio to the plain layers'.

``--flagship`` runs the flagship's Tunix Llama 3 with qwix LoRA instead
(:func:`run_flagship`): exact statistics through
``adaprelora_jax.qwix.LoraProvider`` and tangent statistics through
``qwix.LoraProvider``, against AdamW, at batch × window shapes.

Usage::

  python -m experiments.bench_train [--shapes 16x128 8x512] [--large 32x512] [--rounds 5]
  python -m experiments.bench_train --flagship [--shapes 8x128 32x128]

Writes ``experiments/results/bench_train.json`` (``bench_train_flagship.json``)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaprelora_jax as ap
from adaprelora_jax import nn as lora_nn
from experiments import assets
from experiments.benchmarking import functional
from experiments.models import bert
from experiments.models.layers import PROJECTIONS
from experiments.models.layers import LoRAConfig
from experiments.optimizers import OPTIMIZERS
from experiments.paths import RESULTS
from experiments.paths import environment

RANK = 8
NUM_CLASSES = 5


def build_model(exact_statistics: bool, *, seed: int = 0) -> bert.BertClassifier:
  """Pretrained MiniLM-L6 with rank-8 LoRA on every projection of every block."""
  layer = lora_nn.LoRALinear if exact_statistics else nnx.LoRALinear
  lora = LoRAConfig(PROJECTIONS, rank=RANK, layer_class=layer)
  return bert.BertClassifier.pretrained(
    assets.minilm_dir(), NUM_CLASSES, lora=lora, rngs=nnx.Rngs(seed)
  )


def make_batch(model: bert.BertClassifier, batch: int, tokens: int, *, seed: int = 0):
  """Random token ids, a full attention mask and labels (fixed seed)."""
  rng = np.random.default_rng(seed)
  vocab = model.encoder.config.vocab_size
  ids = jnp.asarray(rng.integers(0, vocab, size=(batch, tokens)), jnp.int32)
  mask = jnp.ones((batch, tokens), jnp.int32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(batch,)), jnp.int32)
  return ids, mask, labels


def classifier_loss(model: bert.BertClassifier, batch) -> jax.Array:
  ids, mask, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(ids, mask), labels).mean()


def compile_train_step(
  model,
  tx: optax.GradientTransformation,
  batch,
  trainable_filter: Any = bert.TRAINABLE,
  model_loss: Callable = classifier_loss,
):
  """The jitted fwd + bwd + update, compiled, with its inputs.

  Returns:
    ``(compiled, args, compile_seconds)``; ``compiled(*args)`` runs one step.
  """
  loss_fn, trainable, rest = functional(model, trainable_filter, model_loss)
  state = tx.init(trainable)

  # Parameters, state and batch are arguments: closing over them would make
  # them constants that XLA folds into the program.
  @jax.jit
  def step(trainable, state, rest, batch):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, rest, batch)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss

  args = (trainable, state, rest, batch)
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  return compiled, args, time.perf_counter() - start


def compile_gradient(
  model, batch, trainable_filter: Any = bert.TRAINABLE, model_loss: Callable = classifier_loss
):
  """The jitted fwd + bwd alone (no update), compiled, with its inputs."""
  loss_fn, trainable, rest = functional(model, trainable_filter, model_loss)
  step = jax.jit(jax.value_and_grad(loss_fn))
  args = (trainable, rest, batch)
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  return compiled, args, time.perf_counter() - start


def interleaved_medians(programs: dict, rounds: int) -> dict[str, dict]:
  """Median and quartiles of each program's wall time over interleaved rounds."""
  for compiled, args in programs.values():
    jax.block_until_ready(compiled(*args))
  times = {name: [] for name in programs}
  for _ in range(rounds):
    for name, (compiled, args) in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[name].append(time.perf_counter() - start)
  return {
    name: {
      "seconds": float(np.median(values)),
      "seconds_iqr": [float(np.percentile(values, 25)), float(np.percentile(values, 75))],
    }
    for name, values in times.items()
  }


def parse_shape(text: str) -> tuple[int, int]:
  batch, tokens = text.lower().split("x")
  return int(batch), int(tokens)


def run(
  shapes: list[tuple[int, int]],
  large: tuple[int, int] | None,
  rounds: int,
  names: list[str] | None = None,
) -> dict:
  names = names or list(OPTIMIZERS)
  if "adamw" not in names:
    names = ["adamw", *names]
  models = {flag: build_model(flag) for flag in (False, True)}
  train_rows, gradient_rows = [], []
  for batch, tokens in shapes:
    data = make_batch(models[False], batch, tokens)
    programs, compile_seconds = {}, {}
    for name in names:
      spec = OPTIMIZERS[name]
      compiled, args, seconds = compile_train_step(
        models[spec.exact_statistics], spec.factory(spec.default_learning_rate), data
      )
      programs[name], compile_seconds[name] = (compiled, args), seconds
      print(f"  {batch}x{tokens} {name}: compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    for flag in (False, True):
      compiled, args, seconds = compile_gradient(models[flag], data)
      programs[_gradient_name(flag)] = (compiled, args)
      compile_seconds[_gradient_name(flag)] = seconds
    measured = interleaved_medians(programs, rounds)
    base = measured["adamw"]["seconds"]
    for name in names:
      train_rows.append(
        {
          "batch": batch,
          "tokens": tokens,
          "optimizer": name,
          "exact_statistics": OPTIMIZERS[name].exact_statistics,
          **measured[name],
          "compile_seconds": compile_seconds[name],
          "ratio_vs_adamw": measured[name]["seconds"] / base,
        }
      )
    gradient_rows.append(_gradient_row(batch, tokens, measured))
  if large is not None:
    batch, tokens = large
    data = make_batch(models[False], batch, tokens)
    programs = {}
    for flag in (False, True):
      compiled, args, _ = compile_gradient(models[flag], data)
      programs[_gradient_name(flag)] = (compiled, args)
    gradient_rows.append(
      {**_gradient_row(batch, tokens, interleaved_medians(programs, rounds)), "large": True}
    )
  return {
    "config": {
      "rank": RANK,
      "blocks": 6,
      "targets": list(PROJECTIONS),
      "pairs": 36,
      "rounds": rounds,
      "model": "all-MiniLM-L6-v2",
    },
    "train_step": train_rows,
    "backward": gradient_rows,
    "environment": environment(),
  }


# The flagship's optimizers: name -> (exact statistics, factory). Its LoRA has
# alpha = rank, so no lora_scale.
FLAGSHIP_OPTIMIZERS: dict[str, tuple[bool, Callable[[], optax.GradientTransformation]]] = {
  "adamw": (False, lambda: optax.adamw(3e-3)),
  "adaprelora (exact)": (True, lambda: ap.adaprelora(3e-4)),
  "adaprelora (tangent)": (False, lambda: ap.adaprelora(3e-4)),
  "adaprelora_adamw (exact)": (True, lambda: ap.adaprelora_adamw(3e-3)),
  "adaprelora_adamw (tangent)": (False, lambda: ap.adaprelora_adamw(3e-3)),
}


def run_flagship(shapes: list[tuple[int, int]], rounds: int) -> dict:
  """The flagship's Tunix Llama 3 with qwix LoRA on its 7 projections (28 pairs):
  fwd + bwd + update with exact statistics
  (:class:`adaprelora_jax.qwix.LoraProvider`) and tangent statistics
  (``qwix.LoraProvider``) against AdamW, and fwd + bwd alone for both
  providers, interleaved in one run. ``tokens`` is the window length."""
  from experiments.models import llama  # noqa: PLC0415  (tunix, optional)
  from experiments.tasks import flagship as task  # noqa: PLC0415

  task._tunix().env_utils.setup_sharding_environment()
  train_rows, gradient_rows = [], []
  with jax.set_mesh(llama.mesh()):
    models = {flag: task.build_model(0, flag)[0] for flag in (False, True)}
    vocab = models[False].config.vocab_size
    for batch, tokens in shapes:
      rng = np.random.default_rng(0)
      windows = jnp.asarray(rng.integers(1, vocab, size=(batch, tokens + 1)), jnp.int32)
      programs = {}
      for name, (flag, factory) in FLAGSHIP_OPTIMIZERS.items():
        compiled, args, seconds = compile_train_step(
          models[flag], factory(), windows, nnx.LoRAParam, task.loss_fn
        )
        programs[name] = (compiled, args)
        print(f"  flagship {batch}x{tokens} {name}: compiled in {seconds:.1f} s", file=sys.stderr)
      for flag in (False, True):
        compiled, args, _ = compile_gradient(models[flag], windows, nnx.LoRAParam, task.loss_fn)
        programs[_gradient_name(flag)] = (compiled, args)
      measured = interleaved_medians(programs, rounds)
      base = measured["adamw"]["seconds"]
      for name, (flag, _) in FLAGSHIP_OPTIMIZERS.items():
        train_rows.append(
          {
            "batch": batch,
            "tokens": tokens,
            "optimizer": name,
            "exact_statistics": flag,
            **measured[name],
            "ratio_vs_adamw": measured[name]["seconds"] / base,
          }
        )
      gradient_rows.append(_gradient_row(batch, tokens, measured))
  return {
    "config": {
      "model": "flagship Tunix Llama 3 (experiments/tasks/flagship.py)",
      "rank": task.RANK,
      "targets": list(task.PROJECTIONS),
      "pairs": len(task.PROJECTIONS) * len(models[False].layers),
      "rounds": rounds,
    },
    "train_step": train_rows,
    "backward": gradient_rows,
    "environment": environment(),
  }


def _gradient_name(exact_statistics: bool) -> str:
  return "fwd+bwd (exact statistics)" if exact_statistics else "fwd+bwd (plain LoRA)"


def _gradient_row(batch: int, tokens: int, measured: dict) -> dict:
  plain = measured[_gradient_name(False)]["seconds"]
  exact = measured[_gradient_name(True)]["seconds"]
  return {
    "batch": batch,
    "tokens": tokens,
    "plain_seconds": plain,
    "exact_seconds": exact,
    "exact_over_plain": exact / plain,
  }


def format_tables(report: dict) -> str:
  shapes = sorted(
    {(row["batch"], row["tokens"]) for row in report["train_step"]},
    key=lambda shape: shape[0] * shape[1],
  )
  names = list(dict.fromkeys(row["optimizer"] for row in report["train_step"]))
  by_key = {(row["batch"], row["tokens"], row["optimizer"]): row for row in report["train_step"]}
  header = "| optimizer | " + " | ".join(f"{b}×{t} step / adamw" for b, t in shapes) + " |"
  lines = [header, "|---|" + "---:|" * len(shapes)]
  adamw_ms = " | ".join(
    f"1.00 ({1e3 * by_key[(b, t, 'adamw')]['seconds']:.0f} ms)" for b, t in shapes
  )
  lines.append(f"| adamw | {adamw_ms} |")
  for name in names:
    if name == "adamw":
      continue
    cells = " | ".join(f"{by_key[(b, t, name)]['ratio_vs_adamw']:.2f}" for b, t in shapes)
    lines.append(f"| {name} | {cells} |")
  lines += [
    "",
    "| batch×tokens | fwd+bwd, plain LoRA (ms) | fwd+bwd, exact statistics (ms) | exact / plain |",
    "|---|---:|---:|---:|",
  ]
  for row in report["backward"]:
    lines.append(
      f"| {row['batch']}×{row['tokens']} | {1e3 * row['plain_seconds']:.0f} | "
      f"{1e3 * row['exact_seconds']:.0f} | {row['exact_over_plain']:.2f} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--shapes", nargs="+", default=["16x128", "8x512"], help="batch×tokens of the train steps"
  )
  parser.add_argument(
    "--large",
    default="32x512",
    help="batch×tokens of the extra fwd+bwd comparison ('none' to skip)",
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--only", nargs="*", help="optimizers to run besides adamw")
  parser.add_argument(
    "--flagship",
    action="store_true",
    help="the flagship Tunix Llama instead (shapes are batch×window, default 8x128 32x128)",
  )
  parser.add_argument("--output", type=Path, default=None)
  args = parser.parse_args()
  if args.flagship:
    shapes = ["8x128", "32x128"] if args.shapes == ["16x128", "8x512"] else args.shapes
    report = run_flagship([parse_shape(shape) for shape in shapes], args.rounds)
    _write(report, args.output or RESULTS / "bench_train_flagship.json")
    return
  large = None if args.large.lower() == "none" else parse_shape(args.large)
  report = run([parse_shape(shape) for shape in args.shapes], large, args.rounds, args.only)
  _write(report, args.output or RESULTS / "bench_train.json")


def _write(report: dict, output: Path) -> None:
  print(format_tables(report))
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  main()
