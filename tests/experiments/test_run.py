"""The experiment runner: lr grids, aggregation, and smoke sweeps of every task."""

import json
import math

import numpy as np
import pytest

from experiments import optimizers
from experiments import report
from experiments import sweeps
from experiments.tasks import TASKS


def test_sweep_grid_reuses_the_pilot_runs():
  for center in optimizers.PILOT_GRID:
    grid = optimizers.sweep_grid(center)
    assert len(grid) == optimizers.GRID_POINTS
    assert grid[2] == center
    # One decade either side is exactly a pilot point (same run identity).
    assert grid[0] == optimizers.canonical_lr(center / 10)
    assert grid[-1] == optimizers.canonical_lr(center * 10)
    assert np.allclose(np.diff(np.log10(grid)), 0.5, atol=2e-3)
  assert set(optimizers.sweep_grid(1e-3)) & set(optimizers.PILOT_GRID) == {1e-4, 1e-3, 1e-2}


def _records(lr, finals):
  return [
    {
      "final_metric": value,
      "curves": {"train_loss": [1.0, value], "eval_step": [2], "eval_accuracy": [value]},
    }
    for value in finals
  ]


def test_summary_picks_the_best_lr_and_the_contiguous_window():
  runs = {
    "0.001": _records(0.001, [0.80, 0.82]),
    "0.00316": _records(0.00316, [0.90, 0.92]),
    "0.01": _records(0.01, [0.88, 0.89]),
    "0.0316": _records(0.0316, [0.50, 0.52]),
    "0.1": _records(0.1, [0.90, 0.90]),
  }
  summary = report.summarize_optimizer(runs, higher_is_better=True, description="x")
  # 0.1 has a mean as high as 0.00316's best but is not contiguous with it.
  assert summary["best_lr"] == pytest.approx(0.00316)
  assert summary["best_mean"] == pytest.approx(0.91)
  assert summary["lr_window"]["learning_rates"] == [0.00316, 0.01]
  assert summary["lr_window"]["decades"] == pytest.approx(math.log10(0.01 / 0.00316))
  assert summary["lrs"]["0.01"]["curves"]["train_loss"] == [[1.0, 0.88], [1.0, 0.89]]


def test_diverged_runs_rank_last_when_lower_is_better():
  runs = {
    "0.01": _records(0.01, [float("nan")]),
    "0.001": _records(0.001, [2.5]),
    "0.0001": _records(0.0001, [2.4]),
  }
  summary = report.summarize_optimizer(runs, higher_is_better=False, description="x")
  assert summary["best_lr"] == pytest.approx(0.0001)
  assert summary["lr_window"]["learning_rates"] == [0.0001, 0.001]


@pytest.mark.parametrize("task_name", ["bbc", "shakespeare_genre", "milton"])
def test_smoke_sweep_of_every_core_optimizer(task_name, tmp_path):
  names = [name for name in optimizers.CORE if name in optimizers.OPTIMIZERS]
  assert {"adaprelora", "adamw"} <= set(names)
  results = sweeps.sweep(
    task_name,
    names,
    "smoke",
    results_dir=tmp_path / "results",
    cache=tmp_path / "runs",
    checkpoints=tmp_path / "ckpt",
    progress=False,
  )
  task = TASKS[task_name]
  written = json.loads((tmp_path / "results" / f"{task_name}_smoke.json").read_text())
  assert written["task"] == task_name and written["metric"] == task.metric
  for key in ("model", "dataset", "higher_is_better", "optimizers", "environment"):
    assert key in written
  assert set(results["optimizers"]) == set(names)
  for entry in results["optimizers"].values():
    assert {"best_lr", "best_mean", "best_std", "lrs"} <= set(entry)
    (lr_entry,) = entry["lrs"].values()
    assert {"seeds", "mean", "std", "curves"} <= set(lr_entry)
    assert all(math.isfinite(value) for value in lr_entry["seeds"])
    steps = task.presets["smoke"].steps
    assert len(lr_entry["curves"]["train_loss"][0]) == steps
  # A second call reuses every stored run instead of training again.
  again = sweeps.sweep(
    task_name,
    names,
    "smoke",
    results_dir=tmp_path / "results",
    cache=tmp_path / "runs",
    checkpoints=tmp_path / "ckpt",
    progress=False,
  )
  assert again["optimizers"] == results["optimizers"]
