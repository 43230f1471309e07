"""Run the optimizer comparison on one task (docs/design.md §8).

Every optimizer gets its own learning-rate grid (same number of points), the
same seeds, step budget, data order and LoRA initialization. Completed runs
are stored one file each, so an interrupted sweep is resumed by running the
same command again; ``--resume`` also continues a run that was interrupted
mid-way from its last checkpoint.

The run cache is not committed, only ``results/<task>.json`` is. ``--merge``
reruns some optimizers on a machine without the others' runs: their entries
replace the old ones in the existing ``<task>.json`` and every other
optimizer's entry is kept as it is there; ``provenance`` records which commit
and date produced each optimizer's entry.

Examples::

  python -m experiments.run --task bbc --optimizer all --preset full
  python -m experiments.run --task digits --optimizer adaprelora adamw --preset smoke
  python -m experiments.run --task bbc --optimizer adaprelora --preset full --merge

This is the command line of :func:`experiments.sweeps.sweep`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments import report
from experiments.optimizers import CORE
from experiments.optimizers import OPTIMIZERS
from experiments.paths import COMPILATION_CACHE
from experiments.paths import RESULTS
from experiments.sweeps import sweep
from experiments.tasks import TASKS
from experiments.training import enable_compilation_cache


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", required=True, choices=sorted(TASKS))
  parser.add_argument(
    "--optimizer",
    nargs="+",
    default=["all"],
    help=f"names among {sorted(OPTIMIZERS)}, 'all' (every registered one) "
    f"or 'core' ({', '.join(CORE)})",
  )
  parser.add_argument("--preset", default="smoke", choices=("smoke", "full"))
  parser.add_argument(
    "--resume", action="store_true", help="continue interrupted runs from their last checkpoint"
  )
  parser.add_argument(
    "--merge",
    action="store_true",
    help="replace only these optimizers' entries in the existing "
    "<task>.json and keep every other optimizer's as it is there",
  )
  parser.add_argument("--results-dir", type=Path, default=RESULTS)
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args()
  enable_compilation_cache(COMPILATION_CACHE)
  if args.optimizer == ["all"]:
    names = list(OPTIMIZERS)
  elif args.optimizer == ["core"]:
    names = list(CORE)
  else:
    names = args.optimizer
  unknown = sorted(set(names) - set(OPTIMIZERS))
  if unknown:
    parser.error(f"unknown optimizers {unknown}; registered: {sorted(OPTIMIZERS)}")
  results = sweep(
    args.task,
    names,
    args.preset,
    results_dir=args.results_dir,
    resume=args.resume,
    progress=not args.no_progress,
    merge=args.merge,
  )
  print(report.results_table(results))
  if args.preset == "full":
    print(f"wrote {report.write_report(args.results_dir)}")


if __name__ == "__main__":
  main()
