"""Where adaprelora's optimizer step spends its time, against its cost model.

On the tree of :mod:`experiments.bench_step` (56 Llama-shaped pairs by
default; :mod:`experiments.benchmarking` builds it), for exact and tangent
statistics:

1. **Counted work.** The dot products of the compiled step, read from its
   optimized HLO: executed flops against the cost model of ``bench_step``
   (:data:`experiments.benchmarking.COST_MODELS`; products inside the
   conditional gradient projection, which backprop gradients skip, are
   reported apart), the LAPACK calls and the copies.
2. **Same-run timings**, each a ratio to ``optax.adamw``:

   * ``step``: the whole update + apply;
   * ``products``: the step's d×r×r products alone, on arrays already stacked
     per group: the compute no implementation of the closed form avoids;
   * ``stacking``: the engine's gather of each group's factors and gradients
     into stacked arrays and its scatter back to the leaves, with one
     element-wise op between (:meth:`adaprelora_jax.LoRAPlan.gather`);
   * ``step, one group per pair``: the step with stacking turned off (every
     pair its own group, so no copies and one kernel per pair).

3. **Compile time** with and without the gradient projection
   (``project_gradients``), on ``bench_scale``'s smaller Llama shapes at
   several layer counts: medians of interleaved compilations, against
   ``optax.adamw``'s.

Usage::

  python -m experiments.profile_step [--hidden 1024 --ffn 2752 --layers 8 --rank 16]

Writes ``experiments/results/profile_step.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import adaprelora_jax as ap
from experiments import benchmarking
from experiments.paths import RESULTS

_PRECISION = jax.lax.Precision.HIGHEST
_DEFINITION = re.compile(r"\s*(?:ROOT )?(%[\w.\-]+) = \w+\[([0-9,]*)\]")
_DOT = re.compile(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[([0-9,]*)\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)")


def _dims(text: str) -> list[int]:
  return [int(size) for size in text.split(",") if size]


def _prod(values) -> int:
  return int(np.prod(list(values), dtype=np.int64))


def hlo_work(hlo: str) -> dict:
  """Dot flops of an optimized HLO module, and its LAPACK calls and copies.

  Flops inside a ``lax.cond`` branch named ``branch_0`` (the gradient
  projection's, which runs only for gradients that are not a backprop
  gradient's) are counted apart from those that always run.
  """
  flops = collections.Counter()
  for computation in re.split(r"\n(?=\S)", hlo):
    shapes = {
      match.group(1): _dims(match.group(2))
      for match in map(_DEFINITION.match, computation.split("\n"))
      if match
    }
    for line in computation.split("\n"):
      match = _DOT.match(line)
      if match is None:
        continue
      lhs = shapes[match.group(2)]
      contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
      depth = _prod(lhs[axis] for axis in _dims(contracting.group(1)))
      kind = "projection branch" if "branch_0" in line else "always"
      flops[kind] += 2 * _prod(_dims(match.group(1))) * depth
  return {
    "dot_flops": dict(flops),
    "lapack_calls": dict(
      collections.Counter(re.findall(r'custom_call_target="(lapack_\w+)"', hlo))
    ),
    "copies": len(re.findall(r" copy\(", hlo)),
  }


def products_alone(plan: ap.LoRAPlan, leaves: list, model: benchmarking.CostModel):
  """The cost model's d×r×r products on pre-stacked group arrays, and those arrays.

  Per side (``model.products_a`` on ``lora_a``'s, ``model.products_b`` on
  ``lora_b``'s) the products alternate between the Gram kind (``xᵀy``,
  contracting ``d``) and the skinny kind (``x M``, giving ``d×r``), as the
  closed form's are.
  """
  stacked = [
    tuple(plan.gather(leaves, group, role) for role in ("a", "b")) for group in plan.groups
  ]

  def side(x, count):
    outputs = [jnp.einsum("ldi,ldj->lij", x, x, precision=_PRECISION)]
    for index in range(count - 1):
      if index % 2 == 0:
        outputs.append(jnp.einsum("ldi,lij->ldj", x, outputs[0], precision=_PRECISION))
      else:
        outputs.append(jnp.einsum("ldi,ldj->lij", x, outputs[-1], precision=_PRECISION))
    return outputs

  def products(stacked):
    # ``b`` (L, r, d_out) as (L, d_out, r): the transpose folds into the dots.
    return [
      side(a, model.products_a) + side(jnp.swapaxes(b, 1, 2), model.products_b) for a, b in stacked
    ]

  return jax.jit(products), (stacked,)


def stacking_alone(plan: ap.LoRAPlan, params, grads):
  """The engine's gather and scatter of factors and gradients, with one add between."""

  def stack_and_scatter(params, grads):
    param_leaves, grad_leaves = plan.leaves(params), plan.leaves(grads)
    out = list(param_leaves)
    for group in plan.groups:
      for role in ("a", "b"):
        summed = plan.gather(param_leaves, group, role) + plan.gather(grad_leaves, group, role)
        plan.scatter(out, group, role, summed)
    return plan.unflatten(out)

  return jax.jit(stack_and_scatter), (params, grads)


def one_group_per_pair(path, leaf):
  """The default pairing with every pair in its own group (no stacking)."""
  role = ap.nnx_pairing(path, leaf)
  return None if role is None else role._replace(layout=role.pair)


def _compiled(fn, args) -> dict:
  return {"compiled": fn.lower(*args).compile(), "args": args}


def compile_attribution(layer_counts: tuple[int, ...], trials: int) -> list[dict]:
  """Compile seconds of adamw and adaprelora with and without the projection."""
  variants = {
    "adamw": benchmarking.OPTIMIZERS["adamw"][0],
    "adaprelora": benchmarking.OPTIMIZERS["adaprelora (tangent)"][0],
    "adaprelora, project_gradients=False": lambda: ap.adaprelora(1e-4, project_gradients=False),
  }
  rows = []
  for layers in layer_counts:
    params, grads = benchmarking.make_lora_tree(256, 688, layers, 16)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(trials):
      for name, factory in variants.items():
        jax.clear_caches()
        seconds[name].append(benchmarking.compile_step(factory(), params, grads)["compile_seconds"])
    adamw = float(np.median(seconds["adamw"]))
    rows += [
      {
        "pairs": 7 * layers,
        "optimizer": name,
        "compile_seconds": float(np.median(values)),
        "compile_ratio_vs_adamw": float(np.median(values)) / adamw,
      }
      for name, values in seconds.items()
    ]
  return rows


def run(
  hidden: int,
  ffn: int,
  layers: int,
  rank: int,
  repeats: int,
  compile_layers: tuple[int, ...] = (1, 32),
  compile_trials: int = 3,
) -> dict:
  programs = {}
  counted = {}
  shapes = list(benchmarking.llama_lora_shapes(hidden, ffn).values()) * layers
  for statistics in ("exact", "tangent"):
    factory, exact = benchmarking.OPTIMIZERS[f"adaprelora ({statistics})"]
    model = benchmarking.COST_MODELS[f"adaprelora ({statistics})"]
    params, grads = benchmarking.make_lora_tree(hidden, ffn, layers, rank, exact_statistics=exact)
    step = benchmarking.compile_step(factory(), params, grads)
    counted[statistics] = hlo_work(step["compiled"].as_text())
    counted[statistics]["model_flops"] = benchmarking.model_work(model, shapes, rank)["flops"]
    programs[f"{statistics}: step"] = step
    programs[f"{statistics}: step, one group per pair"] = benchmarking.compile_step(
      ap.adaprelora(1e-4, pairing=one_group_per_pair), params, grads
    )
    plan = ap.plan_pairs(params)
    programs[f"{statistics}: products"] = _compiled(
      *products_alone(plan, plan.leaves(params), model)
    )
    programs[f"{statistics}: stacking"] = _compiled(*stacking_alone(plan, params, grads))
  programs["adamw"] = benchmarking.compile_step(
    benchmarking.OPTIMIZERS["adamw"][0](), params, grads
  )
  timings = benchmarking.time_interleaved(programs, repeats)
  adamw = timings["adamw"]["step_seconds"]
  return {
    "config": {"hidden": hidden, "ffn": ffn, "layers": layers, "rank": rank, "repeats": repeats},
    "counted": counted,
    "timings": {
      name: {
        "seconds": entry["step_seconds"],
        "ratio_vs_adamw": entry["step_seconds"] / adamw,
        **{key: entry[key] for key in ("compile_seconds", "temp_bytes") if key in entry},
      }
      for name, entry in timings.items()
    },
    "compile": compile_attribution(compile_layers, compile_trials),
    "environment": {"jax": jax.__version__, "backend": jax.default_backend()},
  }


def format_report(report: dict) -> str:
  lines = [
    "| statistics | dot GFLOP (always) | model GFLOP | projection branch GFLOP "
    "| LAPACK calls | copies |",
    "|---|---:|---:|---:|---|---:|",
  ]
  for statistics, work in report["counted"].items():
    flops = work["dot_flops"]
    lapack = ", ".join(f"{name} {count}" for name, count in sorted(work["lapack_calls"].items()))
    lines.append(
      f"| {statistics} | {flops.get('always', 0) / 1e9:.3f} | {work['model_flops'] / 1e9:.3f} | "
      f"{flops.get('projection branch', 0) / 1e9:.3f} | "
      f"{lapack} | {work['copies']} |"
    )
  lines += [
    "",
    "| program | ms | / adamw | compile (s) | scratch (MB) |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, entry in report["timings"].items():
    compile_text = f"{entry['compile_seconds']:.1f}" if "compile_seconds" in entry else ""
    temp = entry.get("temp_bytes")
    temp_text = "" if temp is None else f"{temp / 1e6:.1f}"
    lines.append(
      f"| {name} | {1e3 * entry['seconds']:.2f} | {entry['ratio_vs_adamw']:.2f} | "
      f"{compile_text} | {temp_text} |"
    )
  if report["compile"]:
    lines += ["", "| pairs | optimizer | compile (s) | / adamw |", "|---:|---|---:|---:|"]
    lines += [
      f"| {row['pairs']} | {row['optimizer']} | {row['compile_seconds']:.2f} | "
      f"{row['compile_ratio_vs_adamw']:.2f} |"
      for row in report["compile"]
    ]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  benchmarking.add_tree_arguments(parser)
  parser.add_argument("--output", type=Path, default=RESULTS / "profile_step.json")
  args = parser.parse_args()
  report = run(args.hidden, args.ffn, args.layers, args.rank, args.repeats)
  print(format_report(report))
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
