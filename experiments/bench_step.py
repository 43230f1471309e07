"""Optimizer step time and state size vs optax.adamw on a Llama-shaped LoRA tree.

docs/design.md §7: one process, identical inputs, warm-up, median of repeats with
``block_until_ready``; every figure is a ratio to ``optax.adamw`` measured in
the same run. The pytree has the seven LoRA targets of a Llama block (q, k, v,
o: hidden→hidden; gate, up: hidden→ffn; down: ffn→hidden), scaled down for a
CPU (default hidden 1024, ffn 2752, 8 layers = 56 pairs, rank 16).

Usage::

  python -m experiments.bench_step [--hidden 1024 --ffn 2752 --layers 8 --rank 16]

Writes ``experiments/results/bench_step.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaprelora_jax as ap

RESULTS = Path(__file__).parent / "results"


def llama_lora_shapes(hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
  """(d_in, d_out) of the seven LoRA targets of one Llama block."""
  return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden),
          "v_proj": (hidden, hidden), "o_proj": (hidden, hidden),
          "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn),
          "down_proj": (ffn, hidden)}


def make_lora_tree(hidden: int, ffn: int, layers: int, rank: int, *, seed: int = 0,
                   exact_statistics: bool = False):
  """Params and gradients (consistent with a dense G) for every LoRA pair."""
  key = jax.random.key(seed)
  params, grads = {}, {}
  for layer in range(layers):
    for name, (d_in, d_out) in llama_lora_shapes(hidden, ffn).items():
      key, *subkeys = jax.random.split(key, 5)
      a = jax.random.normal(subkeys[0], (d_in, rank)) / np.sqrt(d_in)
      b = jax.random.normal(subkeys[1], (rank, d_out)) * 1e-2
      # Factor gradients of a rank-8 G plus noise, as backprop would give.
      left = jax.random.normal(subkeys[2], (d_in, 8))
      right = jax.random.normal(subkeys[3], (8, d_out)) / d_out
      grad_a = left @ (right @ b.T)
      grad_b = (a.T @ left) @ right
      pair = {"lora_a": a, "lora_b": b}
      pair_grads = {"lora_a": grad_a, "lora_b": grad_b}
      if exact_statistics:
        pair |= {"grad_sq_rows": jnp.zeros(d_in), "grad_sq_cols": jnp.zeros(d_out)}
        pair_grads |= {"grad_sq_rows": jnp.mean(left**2, axis=1) * 1e-3,
                       "grad_sq_cols": jnp.mean(right**2, axis=0) * 8}
      params[f"layers_{layer}/{name}"] = pair
      grads[f"layers_{layer}/{name}"] = pair_grads
  return params, grads


def tree_bytes(tree) -> int:
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def time_step(tx: optax.GradientTransformation, params, grads, repeats: int) -> dict:
  """Median wall time of a jitted update + apply_updates, after warm-up."""
  state = tx.init(params)

  # Gradients are arguments: closing over them would make them constants that
  # XLA folds into the program.
  @jax.jit
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = time.perf_counter()
  compiled = step.lower(params, grads, state).compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  jax.block_until_ready(compiled(params, grads, state))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, grads, state))
    times.append(time.perf_counter() - start)
  return {"step_seconds": float(np.median(times)),
          "step_seconds_iqr": [float(np.percentile(times, 25)), float(np.percentile(times, 75))],
          "compile_seconds": compile_seconds,
          "state_bytes": tree_bytes(state),
          # Peak scratch memory of the step beyond its inputs and outputs.
          "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes)}


# name -> (factory, needs exact-statistics leaves in the tree)
OPTIMIZERS: dict[str, tuple[Callable[[], optax.GradientTransformation], bool]] = {
    "adamw": (lambda: optax.adamw(1e-4), False),
    "adaprelora (tangent)": (lambda: ap.adaprelora(1e-4), False),
    "adaprelora (exact)": (lambda: ap.adaprelora(1e-4), True),
    "adaprelora (tangent, b1=0.9)": (lambda: ap.adaprelora(1e-4, b1=0.9), False),
    "lora_plus": (lambda: ap.lora_plus(1e-4), False),
    "scaled_gd": (lambda: ap.scaled_gd(1e-4), False),
    "scaled_adamw": (lambda: ap.scaled_adamw(1e-4), False),
    "lora_pro (efficient)": (lambda: ap.lora_pro(1e-4), False),
    "lora_pro (full)": (lambda: ap.lora_pro(1e-4, mode="full"), False),
    "lora_rite": (lambda: ap.lora_rite(1e-4), False),
    "adafactor": (lambda: optax.adafactor(1e-4), False),
}


# Keeps d_in×d_out Adam moments per pair (40× adamw's state): seconds per step
# at the default 56 pairs, so it is measured on one block (``--layers 1 --only
# "lora_pro (full)"``) rather than by default.
FULL_WEIGHT_STATE = ("lora_pro (full)",)


def run(hidden: int, ffn: int, layers: int, rank: int, repeats: int,
        names: list[str] | None = None) -> dict:
  trees = {flag: make_lora_tree(hidden, ffn, layers, rank, exact_statistics=flag)
           for flag in (False, True)}
  results = {}
  for name, (factory, exact) in OPTIMIZERS.items():
    selected = name in names if names else name not in FULL_WEIGHT_STATE
    if not selected and name != "adamw":
      continue
    params, grads = trees[exact]
    results[name] = time_step(factory(), params, grads, repeats)
    print(f"  {name}: step {1e3 * results[name]['step_seconds']:.2f} ms, compile "
          f"{results[name]['compile_seconds']:.1f} s", file=sys.stderr, flush=True)
    results[name]["param_bytes"] = tree_bytes({k: {r: v[r] for r in ("lora_a", "lora_b")}
                                               for k, v in params.items()})
  base = results["adamw"]
  for entry in results.values():
    entry["step_ratio_vs_adamw"] = entry["step_seconds"] / base["step_seconds"]
    entry["state_ratio_vs_adamw"] = entry["state_bytes"] / base["state_bytes"]
  return {
      "config": {"hidden": hidden, "ffn": ffn, "layers": layers, "rank": rank,
                 "pairs": layers * 7, "repeats": repeats,
                 "lora_params": trees[False][0] and tree_bytes(trees[False][0]) // 4},
      "results": results,
      "environment": {"jax": jax.__version__, "optax": optax.__version__,
                      "backend": jax.default_backend(),
                      "devices": [str(d) for d in jax.devices()],
                      "machine": platform.machine(), "python": platform.python_version()},
  }


def format_table(report: dict) -> str:
  lines = ["| optimizer | step (ms) | step / adamw | state (MB) | state / adamw |",
           "|---|---:|---:|---:|---:|"]
  for name, entry in report["results"].items():
    lines.append(f"| {name} | {1e3 * entry['step_seconds']:.2f} | "
                 f"{entry['step_ratio_vs_adamw']:.2f} | {entry['state_bytes'] / 1e6:.2f} | "
                 f"{entry['state_ratio_vs_adamw']:.3f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--ffn", type=int, default=2752)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--only", nargs="*", help="optimizers to run besides adamw")
  parser.add_argument("--output", type=Path, default=RESULTS / "bench_step.json")
  args = parser.parse_args()
  report = run(args.hidden, args.ffn, args.layers, args.rank, args.repeats, args.only)
  config = report["config"]
  print(f"LoRA tree: {config['pairs']} pairs (hidden {config['hidden']}, ffn {config['ffn']}, "
        f"rank {config['rank']}), {config['lora_params'] / 1e6:.2f}M LoRA params, "
        f"backend {report['environment']['backend']}")
  print(format_table(report))
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
