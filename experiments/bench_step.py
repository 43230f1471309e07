"""Optimizer step time and state size vs optax.adamw on a Llama-shaped LoRA tree.

docs/design.md §8: one process, identical inputs, warm-up, median of repeats with
``block_until_ready`` (all steps are compiled first, then timed in interleaved
rounds); every figure is a ratio to ``optax.adamw`` measured in the same run.
The pytree has the seven LoRA targets of a Llama block (q, k, v, o:
hidden→hidden; gate, up: hidden→ffn; down: ffn→hidden), scaled down for a CPU
(default hidden 1024, ffn 2752, 8 layers = 56 pairs, rank 16).

Usage::

  python -m experiments.bench_step [--hidden 1024 --ffn 2752 --layers 8 --rank 16]

Every row also gets a floor: this machine's lower bound for the optimizer's
work, its analytic cost model (:data:`experiments.benchmarking.COST_MODELS`)
over the throughput and bandwidth measured in the same run
(:func:`experiments.benchmarking.measure_machine`); the overlapped floor is in
the JSON too. The tree, the timing and the cost models are
:mod:`experiments.benchmarking`'s, shared with ``bench_scale`` and
``profile_step``.

Writes ``experiments/results/bench_step.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax
import optax

from experiments.benchmarking import COST_MODELS
from experiments.benchmarking import OPTIMIZERS
from experiments.benchmarking import add_tree_arguments
from experiments.benchmarking import compile_step
from experiments.benchmarking import llama_lora_shapes
from experiments.benchmarking import make_lora_tree
from experiments.benchmarking import measure_machine
from experiments.benchmarking import model_work
from experiments.benchmarking import time_interleaved
from experiments.benchmarking import tree_bytes
from experiments.paths import RESULTS


def add_floors(results: dict, machine: dict, shapes: list[tuple[int, int]], rank: int) -> None:
  """Adds each row's modelled work, floor and measured / floor."""
  for name, entry in results.items():
    model = COST_MODELS.get(name)
    if model is None:
      continue
    work = model_work(model, shapes, rank)
    compute = work["flops"] / machine["matmul_flops_per_second"]
    memory = work["bytes"] / machine["bytes_per_second"]
    entry |= {
      "model_flops": work["flops"],
      "model_bytes": work["bytes"],
      "floor_seconds": compute + memory,
      "floor_seconds_overlapped": max(compute, memory),
      "step_over_floor": entry["step_seconds"] / (compute + memory),
    }


# Keeps d_in×d_out Adam moments per pair (40× adamw's state): seconds per step
# at the default 56 pairs, so it is measured on one block (``--layers 1 --only
# "lora_pro (full)"``) rather than by default.
FULL_WEIGHT_STATE = ("lora_pro (full)",)


def run(
  hidden: int, ffn: int, layers: int, rank: int, repeats: int, names: list[str] | None = None
) -> dict:
  trees = {
    flag: make_lora_tree(hidden, ffn, layers, rank, exact_statistics=flag) for flag in (False, True)
  }
  programs = {}
  for name, (factory, exact) in OPTIMIZERS.items():
    selected = name in names if names else name not in FULL_WEIGHT_STATE
    if not selected and name != "adamw":
      continue
    params, grads = trees[exact]
    programs[name] = compile_step(factory(), params, grads)
    programs[name]["param_bytes"] = tree_bytes(
      {k: {r: v[r] for r in ("lora_a", "lora_b")} for k, v in params.items()}
    )
    print(
      f"  {name}: compiled in {programs[name]['compile_seconds']:.1f} s",
      file=sys.stderr,
      flush=True,
    )
  results = time_interleaved(programs, repeats)
  base = results["adamw"]
  for entry in results.values():
    entry["step_ratio_vs_adamw"] = entry["step_seconds"] / base["step_seconds"]
    entry["state_ratio_vs_adamw"] = entry["state_bytes"] / base["state_bytes"]
  shapes = list(llama_lora_shapes(hidden, ffn).values()) * layers
  machine = measure_machine(shapes, rank, repeats)
  add_floors(results, machine, shapes, rank)
  return {
    "config": {
      "hidden": hidden,
      "ffn": ffn,
      "layers": layers,
      "rank": rank,
      "pairs": layers * 7,
      "repeats": repeats,
      "lora_params": trees[False][0] and tree_bytes(trees[False][0]) // 4,
    },
    "machine": machine,
    "results": results,
    "environment": {
      "jax": jax.__version__,
      "optax": optax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "machine": platform.machine(),
      "python": platform.python_version(),
    },
  }


def format_table(report: dict) -> str:
  machine = report.get("machine")
  lines = []
  if machine:
    lines.append(
      f"machine: skinny matmuls {machine['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s, "
      f"element-wise stream {machine['bytes_per_second'] / 1e9:.1f} GB/s"
    )
  lines += [
    "| optimizer | step (ms) | step / adamw | floor (ms) | step / floor | compile (s) "
    "| state (MB) | state / adamw |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, entry in report["results"].items():
    floor = entry.get("floor_seconds")
    floor_text = "" if floor is None else f"{1e3 * floor:.2f}"
    ratio_text = "" if floor is None else f"{entry['step_over_floor']:.2f}"
    lines.append(
      f"| {name} | {1e3 * entry['step_seconds']:.2f} | "
      f"{entry['step_ratio_vs_adamw']:.2f} | {floor_text} | {ratio_text} | "
      f"{entry['compile_seconds']:.1f} | {entry['state_bytes'] / 1e6:.2f} | "
      f"{entry['state_ratio_vs_adamw']:.3f} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_tree_arguments(parser)
  parser.add_argument("--only", nargs="*", help="optimizers to run besides adamw")
  parser.add_argument("--output", type=Path, default=RESULTS / "bench_step.json")
  args = parser.parse_args()
  report = run(args.hidden, args.ffn, args.layers, args.rank, args.repeats, args.only)
  config = report["config"]
  print(
    f"LoRA tree: {config['pairs']} pairs (hidden {config['hidden']}, ffn {config['ffn']}, "
    f"rank {config['rank']}), {config['lora_params'] / 1e6:.2f}M LoRA params, "
    f"backend {report['environment']['backend']}"
  )
  print(format_table(report))
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
