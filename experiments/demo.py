"""Demo: LoRA fine-tuning of pretrained MiniLM on BBC News, adaprelora vs adamw.

A few minutes on two CPU cores. Both optimizers train the same LoRA
adapters (same initialization, same batches) at the learning rate their full
sweep selected (``experiments/results/bbc.json``, falling back to their
registered defaults when the results are absent), then the script prints
held-out accuracy and loss and writes a plot of the curves.

Usage::

  python -m experiments.demo [--steps 60 --seeds 1 --output demo.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

from experiments.optimizers import OPTIMIZERS
from experiments.paths import COMPILATION_CACHE
from experiments.paths import RESULTS
from experiments.tasks import TASKS
from experiments.tasks.base import Budget
from experiments.tasks.base import RunConfig
from experiments.training import enable_compilation_cache
from experiments.training import train

OPTIMIZER_NAMES = ("adaprelora", "adamw")


def selected_learning_rates(results_file: Path) -> dict[str, float]:
  """Each optimizer's swept best learning rate, or its default."""
  swept = {}
  if results_file.exists():
    swept = {
      name: entry["best_lr"]
      for name, entry in json.loads(results_file.read_text())["optimizers"].items()
    }
  return {
    name: float(swept.get(name, OPTIMIZERS[name].default_learning_rate)) for name in OPTIMIZER_NAMES
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--output", type=Path, default=Path("demo.png"))
  args = parser.parse_args()
  enable_compilation_cache(COMPILATION_CACHE)
  task = TASKS["bbc"]
  budget = Budget(steps=args.steps, eval_every=max(args.steps // 4, 1), seeds=args.seeds)
  learning_rates = selected_learning_rates(RESULTS / "bbc.json")
  print(f"task: {task.dataset}\nmodel: {task.model}\n")

  runs = {
    name: [
      train(
        task,
        OPTIMIZERS[name],
        RunConfig("bbc", name, learning_rates[name], seed, "demo", args.steps),
        budget,
      )
      for seed in range(args.seeds)
    ]
    for name in OPTIMIZER_NAMES
  }

  print("| optimizer | lr | held-out accuracy | held-out loss | seconds |")
  print("|---|---:|---:|---:|---:|")
  for name, results in runs.items():
    accuracy, loss, seconds = np.mean(
      [(r.final["accuracy"], r.final["loss"], r.seconds) for r in results], axis=0
    )
    print(
      f"| {name} | {learning_rates[name]:g} | {100 * accuracy:.1f} % | {loss:.4f} | {seconds:.0f} |"
    )

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
  for name, results in runs.items():
    for seed, result in enumerate(results):
      label = name if seed == 0 else None
      (line,) = loss_axis.plot(result.curves["train_loss"], alpha=0.8, label=label)
      accuracy_axis.plot(
        result.curves["eval_step"],
        [100 * value for value in result.curves["eval_accuracy"]],
        marker="o",
        color=line.get_color(),
        label=label,
      )
  loss_axis.set(
    xlabel="step", ylabel="training loss (batch)", yscale="log", title="MiniLM + LoRA on BBC News"
  )
  accuracy_axis.set(xlabel="step", ylabel="held-out accuracy (%)")
  for axis in (loss_axis, accuracy_axis):
    axis.legend()
    axis.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(args.output, dpi=120)
  print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()
