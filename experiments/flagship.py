"""The flagship study (issue 17): Tunix Llama 3 + qwix LoRA on Milton, three presets.

* ``smoke``: AdaPreLoRA (tangent statistics) and AdamW at their registry
  default learning rates, one seed, 4 steps (under a minute; in the test
  suite). AdaPreLoRA's default, 1e-2, is far too large a weight-space step
  for this model (weights of std 0.02) and diverges; the sweep picks its lr.
* ``sweep``: ``experiments.run``'s protocol (pilot over the decade grid, then
  the half-decade grid around each pilot best, 3 seeds, 48 steps) for the
  optimizers of :data:`experiments.tasks.flagship.OPTIMIZERS`; writes
  ``results/flagship.json``, figures and RESULTS.md.
* ``long``: each optimizer at its best learning rate of the sweep, 3 seeds,
  4x the budget (192 steps); writes ``results/flagship_long.json`` (the
  results schema of ``experiments.report`` plus ``time_to_target``: steps
  and training seconds until the held-out bits per character first reach
  AdamW's final mean, and tokens per second) and its figures.

Every completed run is stored in ``experiments/.cache/runs/flagship``, so an
interrupted preset is continued by running the same command again::

  python -m experiments.flagship --preset sweep
  python -m experiments.flagship --preset long

The run cache is not committed; ``--merge`` adds (or reruns) some optimizers
and keeps the others' committed results, e.g.
``--preset sweep --optimizer lora_rite --merge``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments import report
from experiments import run
from experiments.optimizers import canonical_lr
from experiments.tasks import flagship
from experiments.training import RunConfig
from experiments.training import enable_compilation_cache

TASK = flagship.TASK.name
SMOKE_OPTIMIZERS = ("adaprelora_tangent", "adamw")
REFERENCE = "adamw"  # whose final held-out loss is the target of the long leg
TOKENS_PER_STEP = flagship.milton.BATCH * flagship.milton.SEQ_LEN


def long_leg(
  optimizers: list[str],
  *,
  results_dir: Path,
  cache: Path = run.CACHE,
  checkpoints: Path = run.CHECKPOINTS,
  progress: bool = True,
  merge: bool = False,
) -> dict:
  """Runs (or reuses) the long leg at the sweep's best learning rates and writes its results.

  With ``merge``, the other optimizers' entries of the existing results are
  kept (see :func:`experiments.run.write_task_results`), and the steps to
  target are computed over all of them.

  Raises:
    ValueError: ``results_dir`` has no sweep result of one of ``optimizers``.
  """
  swept = json.loads(run.results_file(results_dir, TASK, "full").read_text())["optimizers"]
  missing = sorted(set(optimizers) - set(swept))
  if missing:
    raise ValueError(f"No sweep results of {missing} in {results_dir}; run the sweep first.")
  budget = flagship.TASK.presets["long"]
  run.run_all(
    [
      RunConfig(TASK, name, canonical_lr(swept[name]["best_lr"]), seed, "long", budget.steps)
      for name in optimizers
      for seed in range(budget.seeds)
    ],
    cache=cache,
    checkpoints=checkpoints,
    resume=False,
    progress=progress,
    description=f"{TASK} long",
  )
  results = run.write_task_results(
    TASK, "long", results_dir, cache, optimizers=optimizers, merge=merge
  )
  results["time_to_target"] = time_to_target(results)
  run.results_file(results_dir, TASK, "long").write_text(json.dumps(results, indent=1) + "\n")
  return results


def _best_curves(entry: dict) -> dict[str, Any]:
  (curves,) = [
    lr_entry["curves"] for lr, lr_entry in entry["lrs"].items() if float(lr) == entry["best_lr"]
  ]
  return curves


def time_to_target(results: dict, reference: str = REFERENCE) -> dict[str, Any]:
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
    curves = _best_curves(entry)
    steps, seconds, throughput = [], [], []
    for values, clock in zip(curves[metric], curves["eval_seconds"], strict=True):
      hits = [
        i for i, value in enumerate(values) if (value <= target if lower else value >= target)
      ]
      if hits:
        steps.append(curves["eval_step"][hits[0]])
        seconds.append(clock[hits[0]])
      throughput.append(
        TOKENS_PER_STEP
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


def time_to_target_table(results: dict) -> str:
  """Markdown table of :func:`time_to_target` (ranked by final metric)."""
  summary, metric = results["time_to_target"], results["metric"]
  steps = _best_curves(results["optimizers"][summary["reference"]])["eval_step"][-1]
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
    key=lambda item: -report.score(item[1]["final_mean"], results["higher_is_better"]),
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
      report.provenance_line(results),
      "",
      f"![long leg](results/{task}_long_curves.png)",
      "",
    ]
  )


def plot_long(results: dict, directory: Path) -> Path:
  """Held-out metric vs step and vs training seconds, mean and seed range, target dashed."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  metric, target = results["metric"], results["time_to_target"]["target"]
  fig, (step_axis, time_axis) = plt.subplots(1, 2, figsize=(12, 4))
  for name, entry in results["optimizers"].items():
    curves = _best_curves(entry)
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
  step_axis.set_title(f"{results['task']} long leg: held-out {metric} vs step")
  time_axis.set_title(f"{results['task']} long leg: vs wall-clock seconds")
  fig.tight_layout()
  path = directory / f"{results['task']}_long_curves.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="smoke", choices=("smoke", "sweep", "long"))
  parser.add_argument(
    "--optimizer",
    nargs="+",
    default=None,
    help=f"default: {', '.join(flagship.OPTIMIZERS)} ({', '.join(SMOKE_OPTIMIZERS)} for smoke)",
  )
  parser.add_argument("--results-dir", type=Path, default=run.RESULTS)
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument(
    "--merge",
    action="store_true",
    help="keep the other optimizers' entries of the existing results (the run cache is not "
    "committed; this is how one optimizer is added)",
  )
  args = parser.parse_args()
  enable_compilation_cache(run.COMPILATION_CACHE)
  names = args.optimizer or list(
    SMOKE_OPTIMIZERS if args.preset == "smoke" else flagship.OPTIMIZERS
  )
  progress = not args.no_progress
  if args.preset == "long":
    results = long_leg(names, results_dir=args.results_dir, progress=progress, merge=args.merge)
    print(time_to_target_table(results))
  else:
    results = run.sweep(
      TASK,
      names,
      "full" if args.preset == "sweep" else "smoke",
      results_dir=args.results_dir,
      progress=progress,
      merge=args.merge,
    )
    print(report.results_table(results))
  if args.preset != "smoke":
    print(f"wrote {report.write_report(args.results_dir)}")


if __name__ == "__main__":
  main()
