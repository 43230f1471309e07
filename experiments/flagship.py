"""The flagship study (issue 17): Tunix Llama 3 + qwix LoRA on Milton, three presets.

* ``smoke``: AdaPreLoRA (tangent statistics) and AdamW at their registry
  default learning rates, one seed, 4 steps (under a minute; in the test
  suite). AdaPreLoRA's default, 1e-2, is far too large a weight-space step
  for this model (weights of std 0.02) and diverges; the sweep picks its lr.
* ``sweep``: ``experiments.run``'s protocol (:func:`experiments.sweeps.sweep`:
  pilot over the decade grid, then the half-decade grid around each pilot
  best, 3 seeds, 48 steps) for the optimizers of
  :data:`experiments.tasks.flagship.OPTIMIZERS`; writes
  ``results/flagship.json``, figures and RESULTS.md.
* ``long``: each optimizer at its best learning rate of the sweep, 3 seeds,
  4x the budget (192 steps); writes ``results/flagship_long.json`` (the
  results schema of ``experiments.report`` plus ``time_to_target``: steps
  and training seconds until the held-out bits per character first reach
  AdamW's final mean, and tokens per second) and its figures (drawn by
  :func:`experiments.report.plot_long`).

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

from experiments import report
from experiments.optimizers import canonical_lr
from experiments.paths import CACHE
from experiments.paths import CHECKPOINTS
from experiments.paths import COMPILATION_CACHE
from experiments.paths import RESULTS
from experiments.sweeps import results_file
from experiments.sweeps import run_all
from experiments.sweeps import sweep
from experiments.sweeps import write_task_results
from experiments.tasks import flagship
from experiments.tasks.base import RunConfig
from experiments.training import enable_compilation_cache

TASK = flagship.TASK.name
SMOKE_OPTIMIZERS = ("adaprelora_tangent", "adamw")
REFERENCE = "adamw"  # whose final held-out loss is the target of the long leg
TOKENS_PER_STEP = flagship.TOKENS_PER_STEP


def long_leg(
  optimizers: list[str],
  *,
  results_dir: Path,
  cache: Path = CACHE,
  checkpoints: Path = CHECKPOINTS,
  progress: bool = True,
  merge: bool = False,
) -> dict:
  """Runs (or reuses) the long leg at the sweep's best learning rates and writes its results.

  With ``merge``, the other optimizers' entries of the existing results are
  kept (see :func:`experiments.sweeps.write_task_results`), and the steps to
  target are computed over all of them.

  Raises:
    ValueError: ``results_dir`` has no sweep result of one of ``optimizers``.
  """
  swept = json.loads(results_file(results_dir, TASK, "full").read_text())["optimizers"]
  missing = sorted(set(optimizers) - set(swept))
  if missing:
    raise ValueError(f"No sweep results of {missing} in {results_dir}; run the sweep first.")
  budget = flagship.TASK.presets["long"]
  run_all(
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
  results = write_task_results(TASK, "long", results_dir, cache, optimizers=optimizers, merge=merge)
  results["time_to_target"] = report.time_to_target(results, REFERENCE, TOKENS_PER_STEP)
  results_file(results_dir, TASK, "long").write_text(json.dumps(results, indent=1) + "\n")
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="smoke", choices=("smoke", "sweep", "long"))
  parser.add_argument(
    "--optimizer",
    nargs="+",
    default=None,
    help=f"default: {', '.join(flagship.OPTIMIZERS)} ({', '.join(SMOKE_OPTIMIZERS)} for smoke)",
  )
  parser.add_argument("--results-dir", type=Path, default=RESULTS)
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument(
    "--merge",
    action="store_true",
    help="keep the other optimizers' entries of the existing results (the run cache is not "
    "committed; this is how one optimizer is added)",
  )
  args = parser.parse_args()
  enable_compilation_cache(COMPILATION_CACHE)
  names = args.optimizer or list(
    SMOKE_OPTIMIZERS if args.preset == "smoke" else flagship.OPTIMIZERS
  )
  progress = not args.no_progress
  if args.preset == "long":
    results = long_leg(names, results_dir=args.results_dir, progress=progress, merge=args.merge)
    print(report.time_to_target_table(results))
  else:
    results = sweep(
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
