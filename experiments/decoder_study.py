"""Decoder study v2 (issue 28): the paper's configurations against AdamW, each
tuned at the budget and schedule it is reported at.

The Tunix Llama of :mod:`experiments.tasks.flagship`, LoRA-adapted to Milton
(``flagship``) and to BBC prose (``flagship_bbc``, a real domain shift), under
the ``tune`` preset: 192 steps, linear warmup over 1/16 of them then cosine
decay to 0, the same schedule for every optimizer. Three stages per task,
each resumable (every finished run is stored in the run cache, so running the
same command again continues where it stopped):

* ``tune``: :func:`experiments.sweeps.sweep` at that budget and schedule:
  pilot over the decade grid (seed 0), then the half-decade grid around the
  pilot's best, 3 seeds per point. Writes ``results/<task>_tune.json``.
* ``report``: each optimizer at its selected learning rate (best 3-seed mean
  of ``tune``), :data:`REPORT_SEEDS` seeds; the extra seeds do not enter the
  selection (``write_task_results`` reads only the preset's seeds). Seeds
  share LoRA init and data order across optimizers, so each optimizer's
  difference to AdamW is paired by seed: mean and 95 % t-interval. Also
  steps and seconds to AdamW's final mean, and tokens per second. Writes
  ``results/<task>_study.json``.
* ``early``: the first :data:`EARLY_STEPS` steps of seed 0 at the selected
  learning rate (or at each of ``--learning-rates``; ``--preset long`` for
  the first study's constant learning rate) with
  :func:`adaprelora_jax.track_step_metrics` appended: ``max|a|``, ``max|b|``
  over all adapters after each step, and the weight-space norm of each step
  (first order, ``‖s(δa b + a δb)‖_F``, mean and max over pairs). Adds to
  ``results/<task>_early.json``.

Usage::

  python -m experiments.decoder_study --task flagship --stage tune
  python -m experiments.decoder_study --task flagship --stage report early

``--preset smoke`` runs every stage on 4-step runs at the default learning
rates (a minute per optimizer; what the tests run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import scipy.stats
from flax import nnx

import adaprelora_jax as ap
from experiments import report
from experiments.optimizers import OPTIMIZERS
from experiments.optimizers import canonical_lr
from experiments.paths import CACHE
from experiments.paths import CHECKPOINTS
from experiments.paths import COMPILATION_CACHE
from experiments.paths import RESULTS
from experiments.paths import environment
from experiments.sweeps import results_file
from experiments.sweeps import run_all
from experiments.sweeps import sweep
from experiments.tasks import TASKS
from experiments.tasks import flagship
from experiments.tasks.base import RunConfig
from experiments.training import enable_compilation_cache

REFERENCE = "adamw"
REPORT_SEEDS = 5
EARLY_STEPS = 32
# Milton: the paper's two variants with exact statistics, the AdamW variant
# with the zero-cost tangent statistics, the five baselines, and this
# library's own option motivated by the early steps (a damping floor that
# bounds the SGD variant's early jump in a; not the paper's).
MILTON_OPTIMIZERS = (
  "adaprelora",
  "adaprelora_adamw",
  "adaprelora_adamw_tangent",
  "adamw",
  "lora_plus",
  "scaled_adamw",
  "lora_pro",
  "lora_rite",
  "adaprelora_floor_1e-2",
)
# BBC: AdamW, both AdaPreLoRA variants, and the best baseline of the Milton
# study (added by name once that study has picked it).
BBC_OPTIMIZERS = ("adaprelora", "adaprelora_adamw", "adamw")
OPTIMIZERS_OF_TASK = {"flagship": MILTON_OPTIMIZERS, "flagship_bbc": BBC_OPTIMIZERS}


def paired_difference(values: list[float], reference: list[float]) -> dict[str, float]:
  """Mean of ``values[i] - reference[i]`` (paired by seed) and its 95 % t-interval.

  Raises:
    ValueError: for unequal lengths or fewer than two pairs.
  """
  if len(values) != len(reference) or len(values) < 2:
    raise ValueError(
      f"need two or more seed pairs of equal length, got {len(values)} and {len(reference)}"
    )
  diffs = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
  mean = float(diffs.mean())
  half = float(scipy.stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
  return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "seeds": len(diffs)}


def selected_learning_rates(
  task_name: str, names: list[str], preset: str, results_dir: Path
) -> dict[str, float]:
  """Each optimizer's best learning rate of the ``tune`` stage (for ``smoke``,
  which tunes nothing, its default learning rate).

  Raises:
    ValueError: ``tune`` has not been run for one of ``names``.
  """
  if preset == "smoke":
    return {name: canonical_lr(OPTIMIZERS[name].default_learning_rate) for name in names}
  path = results_file(results_dir, task_name, "tune")
  tuned = json.loads(path.read_text())["optimizers"] if path.exists() else {}
  missing = sorted(set(names) - set(tuned))
  if missing:
    raise ValueError(f"No tune results of {missing} in {path}; run --stage tune first.")
  return {name: canonical_lr(tuned[name]["best_lr"]) for name in names}


def tune(task_name: str, names: list[str], preset: str, results_dir: Path, progress: bool) -> dict:
  """The learning-rate sweep at the reported budget (smoke: default lrs only)."""
  merge = results_file(results_dir, task_name, preset).exists()
  return sweep(task_name, names, preset, results_dir=results_dir, progress=progress, merge=merge)


def summarize(task_name: str, records: list[dict], reference: str = REFERENCE) -> dict[str, Any]:
  """The study's results from the report stage's run records."""
  task = TASKS[task_name]
  by_optimizer: dict[str, dict[str, list[dict]]] = {}
  for record in sorted(records, key=lambda record: record["config"]["seed"]):
    config = record["config"]
    by_optimizer.setdefault(config["optimizer"], {}).setdefault(
      str(config["learning_rate"]), []
    ).append(record)
  optimizers = {
    name: report.summarize_optimizer(by_lr, task.higher_is_better, OPTIMIZERS[name].description)
    for name, by_lr in by_optimizer.items()
  }
  results: dict[str, Any] = {
    "task": task.name,
    "model": task.model,
    "dataset": task.dataset,
    "metric": task.metric,
    "higher_is_better": task.higher_is_better,
    "optimizers": optimizers,
  }
  if reference in optimizers:
    reference_seeds = report.best_lr_entry(optimizers[reference])["seeds"]
    results["paired_difference"] = {
      "reference": reference,
      "optimizers": {
        name: paired_difference(report.best_lr_entry(entry)["seeds"], reference_seeds)
        for name, entry in optimizers.items()
        if name != reference
      },
    }
    results["time_to_target"] = report.time_to_target(results, reference, flagship.TOKENS_PER_STEP)
  return results


def report_stage(
  task_name: str,
  names: list[str],
  preset: str,
  results_dir: Path,
  *,
  cache: Path = CACHE,
  progress: bool = True,
  seeds: int = REPORT_SEEDS,
) -> dict:
  """Runs (or reuses) ``seeds`` seeds at each selected learning rate; writes the study file."""
  budget = TASKS[task_name].presets[preset]
  learning_rates = selected_learning_rates(task_name, names, preset, results_dir)
  records = run_all(
    [
      RunConfig(task_name, name, learning_rates[name], seed, preset, budget.steps)
      for name in names
      for seed in range(seeds)
    ],
    cache=cache,
    checkpoints=CHECKPOINTS,
    resume=False,
    progress=progress,
    description=f"{task_name} report",
  )
  results = summarize(task_name, records)
  results.update(preset=preset, schedule=dataclasses.asdict(budget), environment=environment())
  path = results_dir / f"{task_name}_study{'' if preset == 'tune' else '_' + preset}.json"
  results_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1) + "\n")
  return results


def _max_abs_factors(model: nnx.Module) -> dict[str, float]:
  """The largest ``|entry|`` over the model's ``*lora_a`` and over its ``*lora_b`` leaves."""
  found = {"lora_a": 0.0, "lora_b": 0.0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.LoRAParam)):
    name = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)][-1]
    for suffix in found:
      if name.endswith(suffix):
        found[suffix] = max(found[suffix], float(np.max(np.abs(np.asarray(leaf)))))
  return found


def early_steps(
  task_name: str, name: str, learning_rate: float, preset: str, steps: int = EARLY_STEPS
) -> dict[str, list[float]]:
  """``max|a|``, ``max|b|`` and the step's weight-space norm over the first ``steps`` steps.

  Entry ``k`` of every curve is after ``k`` updates (``update_norm`` of entry
  0 is 0: no step yet).
  """
  task = TASKS[task_name]
  spec = OPTIMIZERS[name]
  tracked = dataclasses.replace(
    spec, factory=lambda lr: optax.chain(spec.factory(lr), ap.track_step_metrics())
  )
  budget = dataclasses.replace(task.presets[preset], eval_every=10**9)
  curves: dict[str, list[float]] = {
    "max_abs_a": [],
    "max_abs_b": [],
    "update_norm_mean": [],
    "update_norm_max": [],
  }

  def probe(done, model, optimizer):
    del done  # called once per step, in order
    metrics = ap.step_metrics(optimizer.opt_state)
    factors = _max_abs_factors(model)
    curves["max_abs_a"].append(factors["lora_a"])
    curves["max_abs_b"].append(factors["lora_b"])
    curves["update_norm_mean"].append(float(metrics["update_norm/mean"]))
    curves["update_norm_max"].append(float(metrics["update_norm/max"]))

  # The run is the reported one cut short: its schedule is the full budget's
  # (warmup and decay over budget.steps), only the first `steps` are taken.
  config = RunConfig(task_name, name, learning_rate, 0, preset, min(steps, budget.steps))
  flagship.train(task, tracked, config, budget, progress=False, step_probe=probe)
  return curves


def early_stage(
  task_name: str,
  names: list[str],
  preset: str,
  results_dir: Path,
  learning_rates: Sequence[float] | None = None,
) -> dict:
  """The early-step curves of every optimizer; adds them to ``<task>_early.json``.

  Args:
    task_name: the task.
    names: the optimizers.
    preset: the budget and schedule the steps are taken under (``tune``;
      ``long`` for the constant learning rate of the first study).
    results_dir: where the file goes.
    learning_rates: run every optimizer at each of these (how the early
      steps change with the learning rate); None: each at its selected one
      (for ``smoke``, its default).

  Returns:
    The file's contents: one entry per (optimizer, learning rate, preset)
    under ``runs``; a run already in the file is not repeated.
  """
  if learning_rates is not None:
    grid = {name: [canonical_lr(lr) for lr in learning_rates] for name in names}
  else:
    selected = selected_learning_rates(task_name, names, preset, results_dir)
    grid = {name: [lr] for name, lr in selected.items()}
  path = results_dir / f"{task_name}_early{'_smoke' if preset == 'smoke' else ''}.json"
  results = json.loads(path.read_text()) if path.exists() else {"task": task_name, "runs": []}
  done = {(run["optimizer"], run["learning_rate"], run["preset"]) for run in results["runs"]}
  for name in names:
    for learning_rate in grid[name]:
      if (name, learning_rate, preset) in done:
        continue
      results["runs"].append(
        {
          "optimizer": name,
          "learning_rate": learning_rate,
          "preset": preset,
          "schedule": TASKS[task_name].presets[preset].schedule,
          "curves": early_steps(task_name, name, learning_rate, preset),
        }
      )
      results["environment"] = environment()
      results_dir.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(results, indent=1) + "\n")
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="flagship", choices=sorted(OPTIMIZERS_OF_TASK))
  parser.add_argument(
    "--stage", nargs="+", default=["tune", "report", "early"], choices=("tune", "report", "early")
  )
  parser.add_argument(
    "--preset",
    default="tune",
    choices=("tune", "smoke", "long"),
    help="long (constant learning rate, 192 steps): for --stage early only",
  )
  parser.add_argument(
    "--learning-rates",
    nargs="+",
    type=float,
    default=None,
    help="--stage early at each of these instead of the selected learning rate",
  )
  parser.add_argument("--optimizer", nargs="+", default=None)
  parser.add_argument("--results-dir", type=Path, default=RESULTS)
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args()
  enable_compilation_cache(COMPILATION_CACHE)
  names = args.optimizer or list(OPTIMIZERS_OF_TASK[args.task])
  progress = not args.no_progress
  stem = f"{args.task}_{args.preset}"
  if "tune" in args.stage:
    results = tune(args.task, names, args.preset, args.results_dir, progress)
    report.plot(results, args.results_dir, stem=stem)
    print(report.results_table(results))
  if "report" in args.stage:
    results = report_stage(args.task, names, args.preset, args.results_dir, progress=progress)
    report.plot_long(results, args.results_dir, stem="study")
    print(json.dumps(results.get("paired_difference", {}), indent=1))
  if "early" in args.stage:
    early = early_stage(args.task, names, args.preset, args.results_dir, args.learning_rates)
    report.plot_early(early, args.results_dir)


if __name__ == "__main__":
  main()
