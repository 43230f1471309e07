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

A long leg's results (``results/<task>_long.json``: the schema above plus
``time_to_target``, :func:`time_to_target`) get their own section of
RESULTS.md and figure (:func:`long_leg_markdown`, :func:`plot_long`).
"""

from __future__ import annotations

import json
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


def time_to_target(results: dict, reference: str, tokens_per_step: int) -> dict[str, Any]:
  """Steps and training seconds until each seed's held-out metric reaches ``reference``'s
  final mean, and steady-state tokens per second (the first evaluation interval, which
  holds compilation, left out).

  Per optimizer: ``reached`` seeds of ``seeds``; ``steps``/``seconds`` means over the seeds
  that reached the target (None: none did).
  """
  metric, lower = f"eval_{results['metric']}", not results["higher_is_better"]
  target = results["optimizers"][reference]["best_mean"]
  summary: dict[str, Any] = {"reference": reference, "target": target, "optimizers": {}}
  for name, entry in results["optimizers"].items():
    curves = best_curves(entry)
    steps, seconds, throughput = [], [], []
    for values, clock in zip(curves[metric], curves["eval_seconds"], strict=True):
      hits = [
        i for i, value in enumerate(values) if (value <= target if lower else value >= target)
      ]
      if hits:
        steps.append(curves["eval_step"][hits[0]])
        seconds.append(clock[hits[0]])
      throughput.append(
        tokens_per_step
        * (curves["eval_step"][-1] - curves["eval_step"][0])
        / (clock[-1] - clock[0])
      )
    summary["optimizers"][name] = {
      "final_mean": entry["best_mean"],
      "final_std": entry["best_std"],
      "learning_rate": entry["best_lr"],
      "seeds": len(curves[metric]),
      "reached": len(steps),
      "steps": float(np.mean(steps)) if steps else None,
      "seconds": float(np.mean(seconds)) if seconds else None,
      "tokens_per_second": float(np.mean(throughput)),
    }
  return summary


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


def plot(results: dict[str, Any], directory: Path, stem: str | None = None) -> list[Path]:
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
  curves_path = directory / f"{stem or task}_curves.png"
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
  lr_path = directory / f"{stem or task}_lr.png"
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


def best_lr_entry(entry: dict) -> dict[str, Any]:
  """An optimizer's entry at its best learning rate (its ``seeds``, ``mean``, ``curves``...)."""
  (found,) = [lr_entry for lr, lr_entry in entry["lrs"].items() if float(lr) == entry["best_lr"]]
  return found


def best_curves(entry: dict) -> dict[str, Any]:
  """The curves of an optimizer's entry at its best learning rate."""
  return best_lr_entry(entry)["curves"]


def time_to_target_table(results: dict) -> str:
  """Markdown table of a long leg's ``time_to_target`` (ranked by final metric).

  ``time_to_target`` is :func:`time_to_target`'s summary.
  """
  summary, metric = results["time_to_target"], results["metric"]
  steps = best_curves(results["optimizers"][summary["reference"]])["eval_step"][-1]
  lines = [
    f"Long leg: {steps} steps, each optimizer at its best learning rate of the "
    f"sweep. Target: {summary['reference']}'s final held-out {metric}, "
    f"{summary['target']:.4f}; seconds are training seconds (evaluations left out, "
    "compilation in).",
    "",
    f"| optimizer | lr | final {metric} (mean ± std) | steps to target | "
    "seconds to target | reached (seeds) | tokens/s |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  ranked = sorted(
    summary["optimizers"].items(),
    key=lambda item: -score(item[1]["final_mean"], results["higher_is_better"]),
  )
  for name, row in ranked:
    steps = "not reached" if row["steps"] is None else f"{row['steps']:.0f}"
    seconds = "not reached" if row["seconds"] is None else f"{row['seconds']:.0f}"
    lines.append(
      f"| {name} | {row['learning_rate']:g} | {row['final_mean']:.4f} ± "
      f"{row['final_std']:.4f} | {steps} | {seconds} | {row['reached']}/"
      f"{row['seeds']} | {row['tokens_per_second']:.0f} |"
    )
  return "\n".join(lines)


def long_leg_markdown(results: dict) -> str:
  """The long leg's section of RESULTS.md."""
  task = results["task"]
  return "\n".join(
    [
      f"## {task} (long leg)",
      "",
      time_to_target_table(results),
      "",
      provenance_line(results),
      "",
      f"![long leg](results/{task}_long_curves.png)",
      "",
    ]
  )


def plot_long(results: dict, directory: Path, stem: str = "long") -> Path:
  """Held-out metric vs step and vs training seconds, mean and seed range, target dashed;
  written to ``<task>_<stem>_curves.png``."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  metric, target = results["metric"], results["time_to_target"]["target"]
  fig, (step_axis, time_axis) = plt.subplots(1, 2, figsize=(12, 4))
  for name, entry in results["optimizers"].items():
    curves = best_curves(entry)
    values = np.asarray(curves[f"eval_{metric}"], dtype=float)
    label = f"{name} (lr {entry['best_lr']:g})"
    for axis, x in (
      (step_axis, np.asarray(curves["eval_step"])),
      (time_axis, np.asarray(curves["eval_seconds"], dtype=float).mean(0)),
    ):
      (line,) = axis.plot(x, values.mean(0), marker=".", label=label)
      axis.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
  for axis, xlabel in ((step_axis, "step"), (time_axis, "training seconds (mean over seeds)")):
    axis.axhline(target, color="gray", linestyle="--", linewidth=1)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(f"held-out {metric} (mean, seed range)")
    axis.legend(fontsize=7)
  step_axis.set_title(f"{results['task']} {stem}: held-out {metric} vs step")
  time_axis.set_title(f"{results['task']} {stem}: vs wall-clock seconds")
  fig.tight_layout()
  path = directory / f"{results['task']}_{stem}_curves.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_early(early: dict, directory: Path) -> Path:
  """``max|a|``, ``max|b|`` and the step's weight-space norm over the first steps
  (``experiments.decoder_study``'s early stage), one row per preset, one colour
  per optimizer, darker for larger learning rates; ``<task>_early.png``."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  presets = sorted({run["preset"] for run in early["runs"]})
  names = list(dict.fromkeys(run["optimizer"] for run in early["runs"]))
  rates = sorted({run["learning_rate"] for run in early["runs"]})
  panels = (("max_abs_a", "max |a|"), ("max_abs_b", "max |b|"), ("update_norm_mean", "step norm"))
  fig, axes = plt.subplots(len(presets), 3, figsize=(15, 4 * len(presets)), squeeze=False)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for run in early["runs"]:
    row = presets.index(run["preset"])
    shade = 0.35 + 0.65 * (rates.index(run["learning_rate"]) + 1) / len(rates)
    for axis, (key, _) in zip(axes[row], panels, strict=True):
      axis.plot(
        run["curves"][key],
        color=colours[names.index(run["optimizer"]) % len(colours)],
        alpha=shade,
        label=f"{run['optimizer']} lr {run['learning_rate']:g}",
      )
  for row, preset in enumerate(presets):
    for axis, (key, title) in zip(axes[row], panels, strict=True):
      # b and the step norm start at 0: linear near 0, logarithmic above.
      if key == "max_abs_a":
        axis.set_yscale("log")
      else:
        axis.set_yscale("symlog", linthresh=1e-4)
      axis.set_xlabel("step")
      axis.set_title(f"{early['task']} ({preset}): {title}")
    axes[row][0].legend(fontsize=6)
  fig.tight_layout()
  path = directory / f"{early['task']}_early.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


RESULTS_DIR = Path(__file__).parent / "results"


def write_report(results_dir: Path = RESULTS_DIR) -> Path:
  """Regenerates figures and ``experiments/RESULTS.md`` from the task JSON files."""
  all_results, long_legs = [], []
  for path in sorted(results_dir.glob("*.json")):
    results = json.loads(path.read_text())
    if "optimizers" in results and results.get("preset") == "full":
      plot(results, results_dir)
      all_results.append(results)
    elif "time_to_target" in results:
      plot_long(results, results_dir)
      long_legs.append(long_leg_markdown(results))
  output = results_dir.parent / "RESULTS.md"
  output.write_text("\n".join([results_markdown(all_results), *long_legs]) + "\n")
  return output


if __name__ == "__main__":
  print(f"wrote {write_report()}")
