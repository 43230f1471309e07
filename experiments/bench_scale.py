"""Compile time, step time and scratch memory vs the number of LoRA pairs.

Usage::

  python -m experiments.bench_scale [--layers 1 8 32] [--repeats 5] [--trials 3]

Llama-shaped LoRA pytrees (seven targets per block, scaled down for CPU:
hidden 256, ffn 688, rank 16) with 7, 56 and 224 pairs (224 is Llama-7B's
count), in two layouts: one leaf per layer (``layers_<i>/<target>``, the
layout of an unrolled model) and stacked, where each target holds all layers
along a leading axis (the layout of ``nnx.scan``-ed blocks). For adaprelora
and ``optax.adamw``, measured in the same run: jit compile time of
update + apply_updates, median step time, and the step's scratch memory
(``compiled.memory_analysis().temp_size_in_bytes``, also as a multiple of the
parameters' bytes: adamw's element-wise update needs almost none). Each
setup is compiled ``--trials`` times per optimizer, interleaved, and the
medians are reported. Same-shaped pairs are stacked and vmapped, so
adaprelora's traced program has one kernel per distinct shape (three here)
whatever the number of layers, and per-layer leaves are cut out of the
stacked results at positions read from the state (one compiled slice kernel
per shape, not one per layer).

Each row also gets its floor (``experiments/benchmarking.py``: the optimizer's
modelled flops over this machine's skinny-matmul throughput plus its bytes
over its element-wise bandwidth, both measured in the same run for the
setup's shapes) and measured / floor. The adaprelora rows use the tangent
model (these trees carry no exact statistics).

Writes ``experiments/results/bench_scale.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
import optax

import adaprelora_jax as ap
from experiments.benchmarking import COST_MODELS
from experiments.benchmarking import llama_lora_shapes
from experiments.benchmarking import make_lora_tree
from experiments.benchmarking import measure_machine
from experiments.benchmarking import model_work
from experiments.benchmarking import time_step
from experiments.benchmarking import tree_bytes
from experiments.paths import RESULTS
from experiments.paths import environment

OPTIMIZERS = {"adamw": lambda: optax.adamw(1e-4), "adaprelora": lambda: ap.adaprelora(1e-4)}
# The cost model of each row (experiments/benchmarking.py::COST_MODELS).
MODELS = {"adamw": COST_MODELS["adamw"], "adaprelora": COST_MODELS["adaprelora (tangent)"]}


def stacked(tree, layers: int):
  """``layers_<i>/<target>`` leaves stacked into one leaf per target."""
  targets = sorted({name.split("/", 1)[1] for name in tree})
  return {
    target: jax.tree.map(
      lambda *xs: jax.numpy.stack(xs), *(tree[f"layers_{i}/{target}"] for i in range(layers))
    )
    for target in targets
  }


def median_run(runs: list[dict]) -> dict:
  """Median compile and step time over repeated measurements of one setup."""
  return {
    **runs[0],
    "compile_seconds": float(np.median([run["compile_seconds"] for run in runs])),
    "compile_seconds_all": [run["compile_seconds"] for run in runs],
    "step_seconds": float(np.median([run["step_seconds"] for run in runs])),
  }


def run(
  layer_counts: list[int], hidden: int, ffn: int, rank: int, repeats: int, trials: int
) -> dict:
  rows = []
  for layers in layer_counts:
    params, grads = make_lora_tree(hidden, ffn, layers, rank)
    shapes = list(llama_lora_shapes(hidden, ffn).values()) * layers
    machine = measure_machine(shapes, rank, max(repeats, 5))
    for layout in ("per-layer", "stacked"):
      if layout == "stacked":
        params_in, grads_in = stacked(params, layers), stacked(grads, layers)
      else:
        params_in, grads_in = params, grads
      # Compile times on a shared 2-core machine vary by ±30 % from run to
      # run: compile every optimizer ``trials`` times, interleaved, and keep
      # the medians.
      runs = {name: [] for name in OPTIMIZERS}
      for _ in range(trials):
        for name, factory in OPTIMIZERS.items():
          runs[name].append(time_step(factory(), params_in, grads_in, repeats))
      measured = {name: median_run(name_runs) for name, name_runs in runs.items()}
      base = measured["adamw"]
      for name, figures in measured.items():
        work = model_work(MODELS[name], shapes, rank)
        floor = (
          work["flops"] / machine["matmul_flops_per_second"]
          + work["bytes"] / machine["bytes_per_second"]
        )
        row = {
          "pairs": 7 * layers,
          "layout": layout,
          "optimizer": name,
          **figures,
          "machine": machine,
          "floor_seconds": floor,
          "step_over_floor": figures["step_seconds"] / floor,
          "compile_ratio": figures["compile_seconds"] / base["compile_seconds"],
          "step_ratio": figures["step_seconds"] / base["step_seconds"],
          # adamw's update is element-wise and runs in place (≈ 0 scratch),
          # so scratch is reported relative to the parameters instead.
          "temp_over_params": (
            None if figures["temp_bytes"] is None else figures["temp_bytes"] / tree_bytes(params_in)
          ),
        }
        rows.append(row)
        print(format_row(row), flush=True)
  return {
    "hidden": hidden,
    "ffn": ffn,
    "rank": rank,
    "repeats": repeats,
    "trials": trials,
    "rows": rows,
    "environment": environment(),
  }


HEADER = (
  f"{'pairs':>5} {'layout':<9} {'optimizer':<10} {'compile s':>9} {'× adamw':>7} "
  f"{'step ms':>8} {'× adamw':>7} {'floor ms':>8} {'× floor':>7} {'temp MB':>8} "
  f"{'× params':>8}"
)


def format_row(row: dict) -> str:
  temp = row["temp_bytes"] / 2**20 if row["temp_bytes"] is not None else float("nan")
  over_params = row["temp_over_params"] if row["temp_over_params"] is not None else float("nan")
  return (
    f"{row['pairs']:>5} {row['layout']:<9} {row['optimizer']:<10} "
    f"{row['compile_seconds']:>9.2f} {row['compile_ratio']:>7.2f} "
    f"{row['step_seconds'] * 1e3:>8.2f} {row['step_ratio']:>7.2f} "
    f"{row['floor_seconds'] * 1e3:>8.2f} {row['step_over_floor']:>7.2f} "
    f"{temp:>8.2f} {over_params:>8.2f}"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--ffn", type=int, default=688)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--trials", type=int, default=3, help="compilations per optimizer and setup (median reported)"
  )
  parser.add_argument("--output", type=Path, default=RESULTS / "bench_scale.json")
  args = parser.parse_args()
  print(HEADER, flush=True)
  report = run(args.layers, args.hidden, args.ffn, args.rank, args.repeats, args.trials)
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
