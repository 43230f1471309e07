"""The optimizer comparison's sweep over one task (docs/design.md §8), as a library.

Every optimizer gets its own learning-rate grid (same number of points), the
same seeds, step budget, data order and LoRA initialization. Each completed
run is stored as one file in the run cache (:func:`run_file`), so an
interrupted sweep resumes where it stopped; :func:`write_task_results`
aggregates the stored runs into ``results/<task>.json``, and with
``merge=True`` replaces only some optimizers' entries of an existing file.

The command lines are ``python -m experiments.run`` (any task) and
``python -m experiments.flagship`` (the flagship's presets).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from pathlib import Path

from tqdm.auto import tqdm

from experiments import report
from experiments.optimizers import OPTIMIZERS
from experiments.optimizers import PILOT_GRID
from experiments.optimizers import canonical_lr
from experiments.optimizers import sweep_grid
from experiments.paths import CACHE
from experiments.paths import CHECKPOINTS
from experiments.paths import environment
from experiments.tasks import TASKS
from experiments.tasks.base import RunConfig
from experiments.training import train


def run_file(cache: Path, config: RunConfig) -> Path:
  """Where ``config``'s run record is stored under the run cache ``cache``."""
  return (
    cache
    / config.task
    / config.preset
    / config.optimizer
    / f"lr={config.learning_rate:g}"
    / f"seed={config.seed}.json"
  )


def run_all(
  configs: list[RunConfig],
  *,
  cache: Path,
  checkpoints: Path,
  resume: bool,
  progress: bool,
  description: str,
) -> list[dict]:
  """Runs every config not already stored; returns all their records."""
  records = []
  for config in tqdm(configs, desc=description, disable=not progress):
    path = run_file(cache, config)
    if path.exists() and json.loads(path.read_text())["config"] == config.identity():
      records.append(json.loads(path.read_text()))
      continue
    task = TASKS[config.task]
    directory = (
      checkpoints
      / config.task
      / config.preset
      / config.optimizer
      / f"lr={config.learning_rate:g}_seed={config.seed}"
    )
    can_resume = resume and directory.exists() and any(directory.iterdir())
    if directory.exists() and not can_resume:
      shutil.rmtree(directory)
    trainer = task.trainer or train
    result = trainer(
      task,
      OPTIMIZERS[config.optimizer],
      config,
      task.presets[config.preset],
      checkpoint_dir=directory,
      resume=can_resume,
      progress=progress,
    )
    record = {
      "config": config.identity(),
      "final": result.final,
      "final_metric": result.final[task.metric],
      "curves": result.curves,
      "seconds": result.seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    records.append(record)
  return records


def sweep(
  task_name: str,
  optimizers: list[str],
  preset: str,
  *,
  results_dir: Path,
  cache: Path = CACHE,
  checkpoints: Path = CHECKPOINTS,
  resume: bool = False,
  progress: bool = True,
  merge: bool = False,
) -> dict:
  """Runs (or reuses) every run of the sweep and writes its results file
  (:func:`results_file`).

  Every preset but ``smoke`` (``full``, and e.g. the decoder study's
  ``tune``): pilot over the decade grid (seed 0), then the half-decade grid
  around each optimizer's pilot best, every seed of the preset (see
  experiments.optimizers). ``smoke``: each optimizer's default learning rate.

  With ``merge``, only ``optimizers``' entries of the existing ``<task>.json``
  are replaced; see :func:`write_task_results`.
  """
  task = TASKS[task_name]
  budget = task.presets[preset]
  kwargs = dict(cache=cache, checkpoints=checkpoints, resume=resume, progress=progress)
  merging = dict(optimizers=optimizers, merge=True) if merge else {}

  def configs(name, learning_rates, seeds):
    return [
      RunConfig(task_name, name, canonical_lr(lr), seed, preset, budget.steps)
      for lr in learning_rates
      for seed in seeds
    ]

  if preset == "smoke":
    run_all(
      [
        config
        for name in optimizers
        for config in configs(name, [OPTIMIZERS[name].default_learning_rate], range(budget.seeds))
      ],
      description=f"{task_name} ({preset})",
      **kwargs,
    )
    return write_task_results(task_name, preset, results_dir, cache, **merging)
  pilots = run_all(
    [config for name in optimizers for config in configs(name, PILOT_GRID, [0])],
    description=f"{task_name} pilot",
    **kwargs,
  )
  centers = {}
  for name in optimizers:
    finals = {
      record["config"]["learning_rate"]: record["final_metric"]
      for record in pilots
      if record["config"]["optimizer"] == name
    }
    centers[name] = max(finals, key=lambda lr: report.score(finals[lr], task.higher_is_better))
  run_all(
    [
      config
      for name in optimizers
      for config in configs(name, sweep_grid(centers[name]), range(budget.seeds))
    ],
    description=f"{task_name} sweep",
    **kwargs,
  )
  return write_task_results(task_name, preset, results_dir, cache, pilot_centers=centers, **merging)


def results_file(results_dir: Path, task_name: str, preset: str) -> Path:
  """``<task>.json`` for ``full``, ``<task>_<preset>.json`` otherwise."""
  suffix = "" if preset == "full" else f"_{preset}"
  return results_dir / f"{task_name}{suffix}.json"


def write_task_results(
  task_name: str,
  preset: str,
  results_dir: Path,
  cache: Path,
  pilot_centers: dict[str, float] | None = None,
  *,
  optimizers: Collection[str] | None = None,
  merge: bool = False,
) -> dict:
  """Aggregates the task's stored runs into ``<task>.json``.

  For a swept preset (``pilot_centers`` given), an optimizer's entry covers
  its sweep grid (every seed); its pilot-only learning rates are listed
  under ``pilot``.

  Args:
    task_name: the task.
    preset: the preset (``full`` writes ``<task>.json``, others
      ``<task>_<preset>.json``).
    results_dir: where the JSON goes.
    cache: the per-run cache the entries are built from.
    pilot_centers: for a swept preset, each optimizer's pilot best.
    optimizers: build entries only from these optimizers' stored runs (None:
      every optimizer in the cache).
    merge: keep the existing file's entries (``optimizers``, ``lr_selection``
      pilot and centers, ``provenance``) of every optimizer not in
      ``optimizers``, verbatim; those in it are replaced. The run cache is not
      committed, so this is how a subset is rerun without losing the rest.

  Returns:
    The results as written.

  Raises:
    ValueError: ``merge`` without ``optimizers``; an optimizer in
      ``optimizers`` has no stored runs; or the existing file is of another
      task, preset or pilot grid.
  """
  if merge and optimizers is None:
    raise ValueError("merge=True needs the rerun optimizers (optimizers=...).")
  task = TASKS[task_name]
  runs: dict[str, dict[str, list[dict]]] = {}
  pilot: dict[str, dict[str, float]] = {}
  seeds = task.presets[preset].seeds
  for path in sorted((cache / task_name / preset).glob("*/*/seed=*.json")):
    record = json.loads(path.read_text())
    optimizer, lr = record["config"]["optimizer"], record["config"]["learning_rate"]
    if optimizers is not None and optimizer not in optimizers:
      continue
    if record["config"]["seed"] >= seeds:
      # More seeds at a selected learning rate (experiments/decoder_study.py)
      # are not the sweep's: selection stays on the preset's seeds.
      continue
    if record["config"]["seed"] == 0 and lr in PILOT_GRID:
      pilot.setdefault(optimizer, {})[str(lr)] = record["final_metric"]
    if pilot_centers is not None and lr not in sweep_grid(pilot_centers.get(optimizer, lr)):
      continue
    runs.setdefault(optimizer, {}).setdefault(str(lr), []).append(record)
  missing = [name for name in optimizers or () if name not in runs]
  if missing:
    raise ValueError(f"No stored runs of {missing} for {task_name} ({preset}) in {cache}.")
  env = environment()
  results = {
    "task": task.name,
    "model": task.model,
    "dataset": task.dataset,
    "metric": task.metric,
    "higher_is_better": task.higher_is_better,
    "preset": preset,
    "optimizers": {
      name: report.summarize_optimizer(by_lr, task.higher_is_better, OPTIMIZERS[name].description)
      for name, by_lr in runs.items()
    },
    "lr_selection": (
      {
        "procedure": "pilot (seed 0, decade grid) then half-decade grid "
        "around the pilot's best, every seed",
        "pilot_grid": list(PILOT_GRID),
        "pilot": pilot,
        "centers": pilot_centers,
      }
      if pilot_centers is not None
      else None
    ),
    "environment": env,
    "provenance": {name: {"commit": env["commit"], "date": env["date"]} for name in runs},
  }
  path = results_file(results_dir, task_name, preset)
  if merge and path.exists():
    results = _merge(json.loads(path.read_text()), results, set(optimizers))
  results_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1) + "\n")
  return results


def _merged(old: dict | None, new: dict | None, rerun: set[str]) -> dict:
  """``old`` with the ``rerun`` names' values taken from ``new``.

  Old order first and new names last, so a merged file's diff shows only what
  was rerun.
  """
  old, new = old or {}, new or {}
  merged = {
    name: new[name] if name in rerun else value
    for name, value in old.items()
    if name not in rerun or name in new
  }
  merged.update((name, value) for name, value in new.items() if name not in merged)
  return merged


def _merge(old: dict, new: dict, rerun: set[str]) -> dict:
  """``new`` (entries of ``rerun`` only) merged into the existing results ``old``."""
  for key in ("task", "preset"):
    if old.get(key) != new[key]:
      raise ValueError(
        f"Cannot merge into a results file of {key} {old.get(key)!r}: this run is {new[key]!r}."
      )
  old_selection, new_selection = old.get("lr_selection"), new["lr_selection"]
  if (old_selection is None) != (new_selection is None) or (
    new_selection is not None and old_selection["pilot_grid"] != new_selection["pilot_grid"]
  ):
    # The kept optimizers' learning rates were chosen by another procedure.
    raise ValueError(
      "Cannot merge: the existing file's lr selection "
      f"({old_selection and old_selection.get('pilot_grid')}) differs from "
      f"this run's ({new_selection and new_selection['pilot_grid']})."
    )
  merged = dict(new)
  merged["optimizers"] = _merged(old["optimizers"], new["optimizers"], rerun)
  if new_selection is not None:
    merged["lr_selection"] = dict(
      new_selection,
      pilot=_merged(old_selection.get("pilot"), new_selection["pilot"], rerun),
      centers=_merged(old_selection.get("centers"), new_selection["centers"], rerun),
    )
  merged["provenance"] = _merged(report.provenance(old), new["provenance"], rerun)
  return merged
