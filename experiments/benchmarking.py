"""What the benchmarks share: the Llama-shaped LoRA tree, compiled and timed steps, floors.

* The tree (:func:`make_lora_tree`): the seven LoRA targets of a Llama block
  (q, k, v, o: hidden→hidden; gate, up: hidden→ffn; down: ffn→hidden) per
  layer, with gradients consistent with a dense G.
* Timing (:func:`compile_step`, :func:`time_interleaved`, :func:`time_step`):
  one process, identical inputs, warm-up, median of repeats with
  ``block_until_ready``; all steps are compiled first, then timed in
  interleaved rounds (docs/design.md §8).
* Floors: this machine's lower bound for an optimizer's work, measured in the
  same run (:func:`measure_machine`). Each optimizer has an analytic cost
  model (:data:`COST_MODELS`): the d×r×r products its algorithm needs per
  pair (flops ``2 d r²`` each, counted per side: ``d = d_in`` for the
  ``lora_a`` side, ``d_out`` for ``lora_b``) and the factor-sized arrays a
  fused implementation must read or write (bytes). r×r work (Cholesky, eigh,
  r³ products) is not counted. The floor is ``flops / matmul throughput +
  bytes / bandwidth`` (no overlap of compute and memory; the overlapped
  floor is their maximum), with the throughput of skinny batched matmuls of
  the tree's shapes and the bandwidth of an element-wise stream over arrays
  of the tree's size.
* :func:`functional`: a model as a pure function of its trainable state, for
  the jitted train steps of ``bench_train`` and ``collectives``.

Used by ``python -m experiments.bench_step``, ``bench_scale`` and
``profile_step`` (and ``bench_train``, ``collectives``); it has no command
line of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaprelora_jax as ap


def llama_lora_shapes(hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
  """(d_in, d_out) of the seven LoRA targets of one Llama block."""
  return {
    "q_proj": (hidden, hidden),
    "k_proj": (hidden, hidden),
    "v_proj": (hidden, hidden),
    "o_proj": (hidden, hidden),
    "gate_proj": (hidden, ffn),
    "up_proj": (hidden, ffn),
    "down_proj": (ffn, hidden),
  }


def make_lora_tree(
  hidden: int, ffn: int, layers: int, rank: int, *, seed: int = 0, exact_statistics: bool = False
):
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
        pair_grads |= {
          "grad_sq_rows": jnp.mean(left**2, axis=1) * 1e-3,
          "grad_sq_cols": jnp.mean(right**2, axis=0) * 8,
        }
      params[f"layers_{layer}/{name}"] = pair
      grads[f"layers_{layer}/{name}"] = pair_grads
  return params, grads


def tree_bytes(tree) -> int:
  """Bytes of all the leaves of ``tree``."""
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def compile_step(tx: optax.GradientTransformation, params, grads) -> dict:
  """A jitted update + apply_updates, compiled, with its inputs and static figures."""
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
  return {
    "compiled": compiled,
    "args": (params, grads, state),
    "compile_seconds": compile_seconds,
    "state_bytes": tree_bytes(state),
    # Peak scratch memory of the step beyond its inputs and outputs.
    "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
  }


def time_interleaved(programs: dict[str, dict], repeats: int) -> dict[str, dict]:
  """Median wall times of compiled steps, run in interleaved rounds after warm-up.

  Each round runs every program once, so load that drifts on a shared machine
  hits every row alike and the same-run ratios stay meaningful.
  """
  for program in programs.values():
    jax.block_until_ready(program["compiled"](*program["args"]))
  times = {name: [] for name in programs}
  for _ in range(repeats):
    for name, program in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(program["compiled"](*program["args"]))
      times[name].append(time.perf_counter() - start)
  return {
    name: {
      "step_seconds": float(np.median(values)),
      "step_seconds_iqr": [float(np.percentile(values, 25)), float(np.percentile(values, 75))],
      **{key: value for key, value in programs[name].items() if key not in ("compiled", "args")},
    }
    for name, values in times.items()
  }


def time_step(tx: optax.GradientTransformation, params, grads, repeats: int) -> dict:
  """Median wall time of a jitted update + apply_updates, after warm-up."""
  return time_interleaved({"step": compile_step(tx, params, grads)}, repeats)["step"]


# name -> (factory, needs exact-statistics leaves in the tree)
OPTIMIZERS: dict[str, tuple[Callable[[], optax.GradientTransformation], bool]] = {
  "adamw": (lambda: optax.adamw(1e-4), False),
  "adaprelora (tangent)": (lambda: ap.adaprelora(1e-4), False),
  "adaprelora (exact)": (lambda: ap.adaprelora(1e-4), True),
  "adaprelora (tangent, b1=0.9)": (lambda: ap.adaprelora(1e-4, b1=0.9), False),
  "adaprelora (surrogate)": (lambda: ap.adaprelora(1e-4, statistics="surrogate"), False),
  "adaprelora (exact, metrics)": (lambda: ap.adaprelora(1e-4, metrics=True), True),
  "adaprelora (tangent, metrics)": (lambda: ap.adaprelora(1e-4, metrics=True), False),
  "adaprelora_adamw (exact)": (lambda: ap.adaprelora_adamw(1e-4), True),
  "adaprelora_adamw (tangent)": (lambda: ap.adaprelora_adamw(1e-4, statistics="tangent"), False),
  "lora_plus": (lambda: ap.lora_plus(1e-4), False),
  "scaled_gd": (lambda: ap.scaled_gd(1e-4), False),
  "scaled_adamw": (lambda: ap.scaled_adamw(1e-4), False),
  "lora_pro (efficient)": (lambda: ap.lora_pro(1e-4), False),
  "lora_pro (full)": (lambda: ap.lora_pro(1e-4, mode="full"), False),
  "lora_rite": (lambda: ap.lora_rite(1e-4), False),
  "adafactor": (lambda: optax.adafactor(1e-4), False),
}


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Analytic work of one optimizer step (see the module docstring).

  Attributes:
    products_a: d_in×r×r products per pair on the ``lora_a`` side.
    products_b: d_out×r×r products per pair on the ``lora_b`` side.
    passes: factor-sized arrays (counted in units of all the LoRA factors)
      read or written, including the parameters, gradients, state and the
      applied update.
    weight_products: d_in×d_out×r products per pair (full-weight methods).
    weight_passes: d_in×d_out arrays read or written per pair.
    note: how the counts were obtained.
  """

  products_a: float
  products_b: float
  passes: float
  weight_products: float = 0.0
  weight_passes: float = 0.0
  note: str = ""


# Counts from reading each algorithm (adaprelora_jax/_src/maths/closed_form.py, baselines/):
#   adamw: read p, g, m, v; write p, m, v (7 passes), no products.
#   adaprelora, exact statistics: Grams aᵀa, aᵀg_a (bbᵀ, g_b bᵀ), then the step
#     S_a = aᵀ diag(p) a, X_a = g_a S_b⁻¹ / p, δa = X_a − a C: 5 products per
#     side; a Gram pass (read a, b, g) and a step pass (read a, b, g, write p).
#   tangent: + g_aᵀg_a and the statistics' two quadratic forms (g_a M, a M'),
#     8 per side; + a statistics pass (read a, g) and an S pass (read a).
#   b1: + read and write the momentum.
#   surrogate: exact + g_aᵀg_a and the statistics' three products per side
#     (g_a B, a K_b, a g_b g_bᵀ), 8 per side; + a statistics pass (read a, g).
#   adaprelora_adamw: the preconditioner's, then Adam over its output: + read
#     and write m, v (4 passes; the direction stays in registers when fused).
#   metrics=True: the factor norms, a pass reading a and b (the other metrics
#     are scalars the step computes anyway).
COST_MODELS: dict[str, CostModel] = {
  "adamw": CostModel(0, 0, 7, note="element-wise: p, g, m, v in; p, m, v out"),
  "adaprelora (tangent)": CostModel(8, 8, 8),
  "adaprelora (exact)": CostModel(5, 5, 5),
  "adaprelora (tangent, b1=0.9)": CostModel(8, 8, 10),
  "adaprelora (surrogate)": CostModel(8, 8, 7),
  "adaprelora (exact, metrics)": CostModel(5, 5, 6, note="exact + the factor norms"),
  "adaprelora (tangent, metrics)": CostModel(8, 8, 9, note="tangent + the factor norms"),
  "adaprelora_adamw (exact)": CostModel(5, 5, 9, note="exact + Adam moments"),
  "adaprelora_adamw (tangent)": CostModel(8, 8, 12, note="tangent + Adam moments"),
  "lora_plus": CostModel(0, 0, 7, note="AdamW with a second learning rate"),
  "scaled_gd": CostModel(2, 2, 4, note="Grams + one preconditioning product per side"),
  "scaled_adamw": CostModel(2, 2, 8, note="scaled_gd + Adam moments"),
  "lora_pro (efficient)": CostModel(4, 5, 8, note="projection + Sylvester gauge + Adam"),
  "lora_pro (full)": CostModel(
    4, 5, 8, weight_products=4, weight_passes=5, note="+ d_in×d_out Adam moments per pair"
  ),
  "lora_rite": CostModel(6, 6, 8, note="approximate: QR/SVD and basis transport not counted"),
  "adafactor": CostModel(0, 0, 7, note="unfactored v at rank < 128; RMS clipping pass"),
}


def model_work(model: CostModel, shapes: list[tuple[int, int]], rank: int) -> dict:
  """Flops and bytes of ``model`` for pairs of the given (d_in, d_out) shapes."""
  factor_floats = sum((d_in + d_out) * rank for d_in, d_out in shapes)
  flops = sum(
    2 * rank * rank * (model.products_a * d_in + model.products_b * d_out)
    + 2 * rank * d_in * d_out * model.weight_products
    for d_in, d_out in shapes
  )
  bytes_ = 4 * (
    model.passes * factor_floats + model.weight_passes * sum(d_in * d_out for d_in, d_out in shapes)
  )
  return {"flops": float(flops), "bytes": float(bytes_)}


def _median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_machine(shapes: list[tuple[int, int]], rank: int, repeats: int) -> dict:
  """This machine's skinny-matmul throughput and element-wise bandwidth.

  Throughput: the two product kinds of the closed form, batched over the
  tree's pairs of each d: the Gram ``(L, d, r)ᵀ(L, d, r)`` and the skinny
  ``(L, d, r)(L, r, r)``, at HIGHEST precision as the kernels run them; total
  flops over total time. Bandwidth: ``x · s + y`` over float32 arrays as large
  as all the LoRA factors (two arrays read, one written).
  """
  sides = {}
  for d_in, d_out in shapes:
    sides[d_in] = sides.get(d_in, 0) + 1
    sides[d_out] = sides.get(d_out, 0) + 1
  precision = jax.lax.Precision.HIGHEST
  gram = jax.jit(lambda x, y: jnp.einsum("lik,lij->lkj", x, y, precision=precision))
  skinny = jax.jit(lambda x, m: jnp.einsum("lik,lkj->lij", x, m, precision=precision))
  key = jax.random.key(1)
  flops = seconds = 0.0
  for d, count in sides.items():
    x = jax.random.normal(key, (count, d, rank))
    m = jax.random.normal(key, (count, rank, rank))
    seconds += _median_seconds(gram, x, x, repeats=repeats)
    seconds += _median_seconds(skinny, x, m, repeats=repeats)
    flops += 2 * (2 * count * d * rank * rank)
  floats = sum((d_in + d_out) * rank for d_in, d_out in shapes)
  x = jnp.ones((floats,), jnp.float32)
  stream = jax.jit(lambda x, y: x * 0.5 + y)
  stream_seconds = _median_seconds(stream, x, x, repeats=repeats)
  return {
    "matmul_flops_per_second": flops / seconds,
    "bytes_per_second": 3 * 4 * floats / stream_seconds,
  }


def add_tree_arguments(parser: argparse.ArgumentParser) -> None:
  """The benchmark tree's options (of ``bench_step`` and ``profile_step``)."""
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--ffn", type=int, default=2752)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)


def functional(model: nnx.Module, trainable_filter: Any, model_loss: Callable):
  """The model split into a graph, its trainable state and the frozen rest.

  Args:
    model: the model (left as it is).
    trainable_filter: the nnx filter of the trained state, e.g. ``nnx.LoRAParam``.
    model_loss: ``model_loss(model, batch)``, the scalar loss.

  Returns:
    ``(loss_fn, trainable, rest)``, where ``loss_fn(trainable, rest, batch)``
    is ``model_loss`` of the model merged back from its parts, so a jitted
    step can take the states as arguments.
  """
  graphdef, trainable, rest = nnx.split(model, trainable_filter, ...)

  def loss_fn(trainable, rest, batch):
    return model_loss(nnx.merge(graphdef, trainable, rest), batch)

  return loss_fn, trainable, rest
