"""Aggregating runs into the results JSON, RESULTS.md and figures.

Schema of ``experiments/results/<task>.json`` (one file per task)::

  {"task", "model", "dataset", "metric", "higher_is_better", "preset",
   "optimizers": {name: {"description", "best_lr", "best_mean", "best_std",
                         "lr_window": {"within": 0.05, "learning_rates", "points", "decades"},
                         "lrs": {"<lr>": {"seeds": [final metric per seed], "mean", "std",
                                          "curves": {"train_loss": [[per seed]], "eval_step",
                                                     "eval_<metric>": [[per seed]], ...}}}}},
   "lr_selection": {"procedure", "pilot_grid", "pilot": {name: {"<lr>": seed-0 metric}},
                    "centers": {name: lr}} (``full`` only, else null),
   "environment": {"jax", ..., "commit", "date"} (the run that wrote the file),
   "provenance": {name: {"commit", "date"}}}

``provenance`` says which commit and date produced each optimizer's entry: they
differ when ``python -m experiments.run --merge`` reran only some optimizers.
Files written before it existed lack it; :func:`provenance` then takes every
entry's from ``environment``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = 0.05  # the good-lr window: mean within 5 % of the best mean


def score(mean: float, higher_is_better: bool) -> float:
  """Larger is better; NaN (diverged) ranks last."""
  if not math.isfinite(mean):
    return -math.inf
  return mean if higher_is_better else -mean


def lr_window(
  lrs: dict[str, dict], best_lr: str, higher_is_better: bool, within: float = WINDOW
) -> dict[str, Any]:
  """The contiguous run of grid learning rates around the best one whose mean is
  within ``within`` (relative) of the best mean."""
  ordered = sorted(lrs, key=float)
  best = lrs[best_lr]["mean"]

  def good(lr):
    mean = lrs[lr]["mean"]
    if not math.isfinite(mean):
      return False
    return mean >= best * (1 - within) if higher_is_better else mean <= best * (1 + within)

  index = ordered.index(best_lr)
  low = high = index
  while low > 0 and good(ordered[low - 1]):
    low -= 1
  while high < len(ordered) - 1 and good(ordered[high + 1]):
    high += 1
  window = [float(lr) for lr in ordered[low : high + 1]]
  return {
    "within": within,
    "learning_rates": window,
    "points": len(window),
    "decades": float(np.log10(window[-1] / window[0])),
  }


def summarize_optimizer(
  runs: dict[str, list[dict]], higher_is_better: bool, description: str
) -> dict[str, Any]:
  """``runs``: {lr string: [per-seed run records]} → the optimizer's entry."""
  lrs = {}
  for lr, records in sorted(runs.items(), key=lambda item: float(item[0])):
    finals = [record["final_metric"] for record in records]
    curves: dict[str, Any] = {}
    for record in records:
      for name, values in record["curves"].items():
        if name == "eval_step":
          curves[name] = values
        else:
          curves.setdefault(name, []).append(values)
    lrs[lr] = {
      "seeds": finals,
      "mean": float(np.mean(finals)),
      "std": float(np.std(finals)),
      "curves": curves,
    }
  best_lr = max(lrs, key=lambda lr: score(lrs[lr]["mean"], higher_is_better))
  return {
    "description": description,
    "best_lr": float(best_lr),
    "best_mean": lrs[best_lr]["mean"],
    "best_std": lrs[best_lr]["std"],
    "lr_window": lr_window(lrs, best_lr, higher_is_better),
    "lrs": lrs,
  }


def provenance(results: dict[str, Any]) -> dict[str, dict[str, str]]:
  """{optimizer: {"commit", "date"}} of each entry of a results file."""
  environment = results.get("environment", {})
  default = {"commit": environment.get("commit", ""), "date": environment.get("date", "")}
  recorded = results.get("provenance") or {}
  return {name: recorded.get(name, default) for name in results["optimizers"]}


def provenance_line(results: dict[str, Any]) -> str:
  """One line naming the commit and date of each group of entries."""
  groups: dict[tuple[str, str], list[str]] = {}
  for name, source in provenance(results).items():
    groups.setdefault((source["commit"][:7] or "unknown commit", source["date"]), []).append(name)
  return (
    "Runs: "
    + "; ".join(
      f"{', '.join(names)} at {commit} ({date})" for (commit, date), names in groups.items()
    )
    + "."
  )


def results_table(results: dict[str, Any]) -> str:
  """Markdown table: each optimizer at its best learning rate."""
  metric = results["metric"]
  arrow = "↑" if results["higher_is_better"] else "↓"
  lines = [
    f"| optimizer | best lr | {metric} {arrow} (mean ± std) | seeds | "
    f"lr window within {int(100 * WINDOW)} % (points, decades) |",
    "|---|---:|---:|---:|---:|",
  ]
  ranked = sorted(
    results["optimizers"].items(),
    key=lambda item: -score(item[1]["best_mean"], results["higher_is_better"]),
  )
  for name, entry in ranked:
    seeds = len(entry["lrs"][_lr_key(entry)]["seeds"])
    window = entry["lr_window"]
    lines.append(
      f"| {name} | {entry['best_lr']:g} | {entry['best_mean']:.4f} ± "
      f"{entry['best_std']:.4f} | {seeds} | {window['points']} "
      f"({window['decades']:.1f}) |"
    )
  return "\n".join(lines)


def _lr_key(entry: dict) -> str:
  return next(lr for lr in entry["lrs"] if float(lr) == entry["best_lr"])


def plot(results: dict[str, Any], directory: Path) -> list[Path]:
  """Loss curves at each optimizer's best lr, and final metric vs lr."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  task, metric = results["task"], results["metric"]
  fig, (curve_axis, eval_axis) = plt.subplots(1, 2, figsize=(12, 4))
  for name, entry in results["optimizers"].items():
    curves = entry["lrs"][_lr_key(entry)]["curves"]
    loss = np.asarray(curves["train_loss"], dtype=float)
    steps = np.arange(1, loss.shape[1] + 1)
    # Batch losses are noisy: smooth over ~1/15 of the run, and shade the
    # range over seeds (a ± std band leaves a log axis when std > mean).
    window = max(1, loss.shape[1] // 15)
    kernel = np.ones(window) / window
    smooth = np.stack([np.convolve(row, kernel, mode="valid") for row in loss])
    x = steps[window - 1 :]
    (line,) = curve_axis.plot(x, smooth.mean(0), label=f"{name} (lr {entry['best_lr']:g})")
    curve_axis.fill_between(x, smooth.min(0), smooth.max(0), color=line.get_color(), alpha=0.15)
    evaluated = np.asarray(curves[f"eval_{metric}"], dtype=float)
    eval_axis.errorbar(
      curves["eval_step"], evaluated.mean(0), yerr=evaluated.std(0), label=name, capsize=2
    )
  curve_axis.set_yscale("log")
  curve_axis.set_xlabel("step")
  curve_axis.set_ylabel("training loss (moving avg., seed range)")
  curve_axis.set_title(f"{task}: training loss at each optimizer's best lr")
  curve_axis.legend(fontsize=7)
  eval_axis.set_xlabel("step")
  eval_axis.set_ylabel(f"held-out {metric}")
  eval_axis.set_title(f"{task}: held-out {metric} at best lr")
  fig.tight_layout()
  curves_path = directory / f"{task}_curves.png"
  fig.savefig(curves_path, dpi=120)
  plt.close(fig)

  fig, axis = plt.subplots(figsize=(6, 4))
  for name, entry in results["optimizers"].items():
    lrs = sorted(entry["lrs"], key=float)
    axis.errorbar(
      [float(lr) for lr in lrs],
      [entry["lrs"][lr]["mean"] for lr in lrs],
      yerr=[entry["lrs"][lr]["std"] for lr in lrs],
      marker="o",
      capsize=2,
      label=name,
    )
  axis.set_xscale("log")
  axis.set_xlabel("learning rate")
  axis.set_ylabel(f"final {metric}")
  axis.set_title(f"{task}: final held-out {metric} vs learning rate")
  axis.legend(fontsize=7)
  fig.tight_layout()
  lr_path = directory / f"{task}_lr.png"
  fig.savefig(lr_path, dpi=120)
  plt.close(fig)
  return [curves_path, lr_path]


def results_markdown(all_results: list[dict[str, Any]]) -> str:
  """The generated experiments/RESULTS.md."""
  parts = [
    "# Results",
    "",
    "Generated by `python -m experiments.report` from `experiments/results/*.json`; "
    "do not edit by hand. Each optimizer is shown at its best learning rate "
    "(mean ± std over seeds of the final held-out metric); the lr window is the "
    "contiguous range of grid learning rates around the best whose mean is within "
    f"{int(100 * WINDOW)} % of the best.",
    "",
  ]
  for results in all_results:
    parts += [
      f"## {results['task']}",
      "",
      f"Model: {results['model']}. Data: {results['dataset']}. Preset: {results['preset']}.",
      "",
      results_table(results),
      "",
      provenance_line(results),
      "",
      f"![curves](results/{results['task']}_curves.png)",
      f"![lr sweep](results/{results['task']}_lr.png)",
      "",
    ]
  return "\n".join(parts)


RESULTS_DIR = Path(__file__).parent / "results"


def write_report(results_dir: Path = RESULTS_DIR) -> Path:
  """Regenerates figures and ``experiments/RESULTS.md`` from the task JSON files."""
  import json  # pylint: disable=import-outside-toplevel

  from experiments import flagship  # pylint: disable=import-outside-toplevel

  all_results, long_legs = [], []
  for path in sorted(results_dir.glob("*.json")):
    results = json.loads(path.read_text())
    if "optimizers" in results and results.get("preset") == "full":
      plot(results, results_dir)
      all_results.append(results)
    elif "time_to_target" in results:
      flagship.plot_long(results, results_dir)
      long_legs.append(flagship.long_leg_markdown(results))
  output = results_dir.parent / "RESULTS.md"
  output.write_text("\n".join([results_markdown(all_results), *long_legs]) + "\n")
  return output


if __name__ == "__main__":
  print(f"wrote {write_report()}")
