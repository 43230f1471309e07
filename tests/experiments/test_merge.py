"""Merging a rerun of some optimizers into an existing results file.

The per-run cache is not committed, only ``results/<task>.json`` is: a rerun
of a subset must replace those optimizers' entries and keep every other
optimizer's entry exactly as it is in the file.
"""

import json
import math
import sys

import pytest

from experiments import report
from experiments import run
from experiments import sweeps
from experiments.optimizers import PILOT_GRID
from experiments.optimizers import sweep_grid
from experiments.tasks.base import RunConfig

TASK = "digits"
STEPS = 300  # digits' full preset; synthetic runs are never trained


class FakeEnvironment:
  """Stands in for sweeps.environment: the commit is set by each test stage."""

  def __init__(self):
    self.commit = ""

  def __call__(self):
    return {"jax": "x", "commit": self.commit, "date": f"date of {self.commit}"}


@pytest.fixture
def env(monkeypatch):
  fake = FakeEnvironment()
  monkeypatch.setattr(sweeps, "environment", fake)
  return fake


def _metric(lr, seed, center, base):
  # Peaks at the center, a little seed noise: every entry's numbers differ.
  return base - 0.05 * abs(math.log10(lr / center)) + 0.001 * seed


def _store_sweep(cache, name, center, base):
  """Writes the run records of a full sweep of ``name`` without training."""
  configs = {RunConfig(TASK, name, lr, 0, "full", STEPS) for lr in PILOT_GRID}
  configs |= {
    RunConfig(TASK, name, lr, seed, "full", STEPS) for lr in sweep_grid(center) for seed in range(3)
  }
  for config in configs:
    value = _metric(config.learning_rate, config.seed, center, base)
    record = {
      "config": config.identity(),
      "final": {"accuracy": value},
      "final_metric": value,
      "curves": {
        "train_loss": [1.0 - value * k / 30 for k in range(30)],
        "eval_step": [150, 300],
        "eval_accuracy": [value - 0.1, value],
      },
      "seconds": 1.0,
    }
    path = sweeps.run_file(cache, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")


def _entry_text(text, name):
  """The lines of ``name``'s entry under "optimizers" in a written results file."""
  lines = text.splitlines()
  start = lines.index(f'  "{name}": {{', lines.index(' "optimizers": {'))
  end = next(i for i in range(start + 1, len(lines)) if lines[i] in ("  }", "  },"))
  return "\n".join(lines[start:end]) + "\n  }"


@pytest.fixture
def old_file(tmp_path, env):
  """A committed-style results file (adamw, adaprelora; no ``provenance``)."""
  env.commit = "old"
  cache = tmp_path / "old_runs"
  _store_sweep(cache, "adamw", 1e-3, 0.90)
  _store_sweep(cache, "adaprelora", 1e-2, 0.95)
  results = sweeps.write_task_results(
    TASK, "full", tmp_path / "results", cache, pilot_centers={"adamw": 1e-3, "adaprelora": 1e-2}
  )
  # Files written before per-optimizer provenance existed lack the key.
  results.pop("provenance", None)
  path = tmp_path / "results" / f"{TASK}.json"
  path.write_text(json.dumps(results, indent=1) + "\n")
  return path


def _rerun(tmp_path, env, commit, centers, *, merge=True):
  """Reruns ``centers``' sweeps ({name: center}) from a fresh cache, as on another machine."""
  env.commit = commit
  cache = tmp_path / f"{commit}_runs"
  for name, center in centers.items():
    _store_sweep(cache, name, center, 0.80)
  options = dict(optimizers=list(centers), merge=True) if merge else {}
  return sweeps.write_task_results(
    TASK, "full", tmp_path / "results", cache, pilot_centers=dict(centers), **options
  )


def test_merge_replaces_the_rerun_optimizers_and_keeps_the_others(tmp_path, env, old_file):
  old_text = old_file.read_text()
  old = json.loads(old_text)
  merged = _rerun(tmp_path, env, "new", {"adaprelora": 1e-3, "lora_plus": 1e-3})
  new_text = old_file.read_text()
  assert json.loads(new_text) == json.loads(json.dumps(merged))

  # The kept optimizer's entry is byte for byte the one in the old file.
  assert '"best_lr"' in _entry_text(old_text, "adamw")
  assert _entry_text(new_text, "adamw") == _entry_text(old_text, "adamw")
  assert merged["lr_selection"]["pilot"]["adamw"] == old["lr_selection"]["pilot"]["adamw"]
  # Old order first, new optimizers after: the diff shows only what was rerun.
  assert list(merged["optimizers"]) == ["adamw", "adaprelora", "lora_plus"]

  # The rerun optimizer's entries are the new runs', not the old file's.
  adaprelora = merged["optimizers"]["adaprelora"]
  assert adaprelora != old["optimizers"]["adaprelora"]
  assert sorted(adaprelora["lrs"], key=float) == [str(lr) for lr in sweep_grid(1e-3)]
  assert adaprelora["best_lr"] == pytest.approx(1e-3)
  assert adaprelora["best_mean"] == pytest.approx(0.801)
  assert merged["lr_selection"]["pilot"]["adaprelora"] == {
    str(lr): _metric(lr, 0, 1e-3, 0.80) for lr in PILOT_GRID
  }
  assert merged["lr_selection"]["centers"] == {"adamw": 1e-3, "adaprelora": 1e-3, "lora_plus": 1e-3}

  # Kept entries take their provenance from the old file's environment.
  assert merged["environment"]["commit"] == "new"
  assert merged["provenance"] == {
    "adamw": {"commit": "old", "date": "date of old"},
    "adaprelora": {"commit": "new", "date": "date of new"},
    "lora_plus": {"commit": "new", "date": "date of new"},
  }

  # A second merge keeps the recorded provenance, not the file's environment.
  again = _rerun(tmp_path, env, "newer", {"lora_plus": 1e-2})
  assert again["provenance"] == {
    "adamw": {"commit": "old", "date": "date of old"},
    "adaprelora": {"commit": "new", "date": "date of new"},
    "lora_plus": {"commit": "newer", "date": "date of newer"},
  }
  assert again["optimizers"]["adaprelora"] == merged["optimizers"]["adaprelora"]
  assert _entry_text(old_file.read_text(), "adamw") == _entry_text(old_text, "adamw")


def test_without_merge_the_optimizers_missing_from_the_cache_are_dropped(tmp_path, env, old_file):
  # Why --merge exists: the file is rebuilt from the run cache alone.
  results = _rerun(tmp_path, env, "new", {"adaprelora": 1e-3}, merge=False)
  assert list(results["optimizers"]) == ["adaprelora"]
  assert "adamw" not in json.loads(old_file.read_text())["optimizers"]


def test_merge_refuses_what_it_cannot_merge(tmp_path, env, old_file):
  with pytest.raises(ValueError, match="optimizers="):
    sweeps.write_task_results(
      TASK, "full", tmp_path / "results", tmp_path / "none", pilot_centers={}, merge=True
    )
  with pytest.raises(ValueError, match="No stored runs"):
    sweeps.write_task_results(
      TASK,
      "full",
      tmp_path / "results",
      tmp_path / "none",
      pilot_centers={"lora_plus": 1e-3},
      optimizers=["lora_plus"],
      merge=True,
    )
  old = json.loads(old_file.read_text())
  old["lr_selection"]["pilot_grid"] = [1e-4, 1e-3]
  old_file.write_text(json.dumps(old, indent=1) + "\n")
  with pytest.raises(ValueError, match="lr selection"):
    _rerun(tmp_path, env, "new", {"adaprelora": 1e-3})
  # Nothing is written when the merge is refused.
  assert json.loads(old_file.read_text()) == old


def test_report_reads_merged_and_old_files(tmp_path, env, old_file):
  old = json.loads(old_file.read_text())
  assert report.provenance(old) == {
    name: {"commit": "old", "date": "date of old"} for name in ("adamw", "adaprelora")
  }
  merged = _rerun(tmp_path, env, "new", {"adaprelora": 1e-3})
  markdown = report.results_markdown([old, merged])
  assert "Runs: adamw, adaprelora at old (date of old)." in markdown
  assert "Runs: adamw at old (date of old); adaprelora at new (date of new)." in markdown
  written = report.write_report(tmp_path / "results")
  assert "adaprelora at new" in written.read_text()
  assert (tmp_path / "results" / f"{TASK}_curves.png").exists()
  assert (tmp_path / "results" / f"{TASK}_lr.png").exists()


def test_smoke_sweep_merges_a_subset_into_the_file(tmp_path):
  # Real runs through sweep(): each optimizer trained on its own machine (cache).
  results_dir = tmp_path / "results"
  first = sweeps.sweep(
    TASK,
    ["adamw"],
    "smoke",
    results_dir=results_dir,
    cache=tmp_path / "runs_a",
    checkpoints=tmp_path / "ckpt",
    progress=False,
  )
  path = results_dir / f"{TASK}_smoke.json"
  first_text = path.read_text()
  merged = sweeps.sweep(
    TASK,
    ["adaprelora"],
    "smoke",
    results_dir=results_dir,
    cache=tmp_path / "runs_b",
    checkpoints=tmp_path / "ckpt",
    progress=False,
    merge=True,
  )
  assert list(merged["optimizers"]) == ["adamw", "adaprelora"]
  assert _entry_text(path.read_text(), "adamw") == _entry_text(first_text, "adamw")
  assert math.isfinite(merged["optimizers"]["adaprelora"]["best_mean"])
  assert merged["lr_selection"] is None
  assert set(merged["provenance"]) == {"adamw", "adaprelora"}
  assert merged["provenance"]["adamw"] == first["provenance"]["adamw"]


def test_cli_passes_merge_to_the_sweep(monkeypatch):
  calls = []

  def fake_sweep(task_name, names, preset, **kwargs):
    calls.append((task_name, names, preset, kwargs["merge"]))
    return {}

  monkeypatch.setattr(run, "sweep", fake_sweep)
  monkeypatch.setattr(run, "enable_compilation_cache", lambda directory: None)
  monkeypatch.setattr(run.report, "results_table", lambda results: "")
  for argv, merge in ((["--merge"], True), ([], False)):
    monkeypatch.setattr(
      sys, "argv", ["run", "--task", TASK, "--optimizer", "adaprelora", "adamw", *argv]
    )
    run.main()
    assert calls.pop() == (TASK, ["adaprelora", "adamw"], "smoke", merge)
