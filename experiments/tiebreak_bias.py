"""Is the paper's gauge rule biased when the Kronecker factors of H differ?

The referee's question (``docs/design.md`` §4): the two Kronecker factors
``p`` (rows) and ``q`` (columns) of the Adafactor preconditioner
``H[X] = diag(p) X diag(q)`` can differ greatly in magnitude and be badly
conditioned; does the rule that picks a member of the solution family of
``docs/design.md`` §3 then drift away from the best member? The authors
answered that the H-norm deviation stays below 4 % for condition numbers up
to 1e4 (and magnitude ratios up to 100). The rule in question is the paper's,
``tie_breaker="min_imbalance"`` (the default): the member minimizing
``‖δa b − a δb‖_H`` over the whole gauge family, which for the factor
gradients of one ``G`` (as here) is the θ = ½ member. The other rules of
``ap.TIE_BREAKERS`` are scored alongside, among them ``"equal_norms"``,
an earlier misreading of the paper (equal H-norms of ``δa b`` and ``a δb``,
θ clipped to [0, 1]).

Definitions (all measured in float64 on the exact family):

* The θ-line (``docs/design.md`` §3): ``δa(θ) = X_a − θ·aN``,
  ``δb(θ) = X_b − (1−θ)·Nb``; every member has the same first-order weight
  change ``δW`` (the H-projection of ``H⁻¹G``).
* What θ changes: a step of size η moves ``W`` by ``−η δW + η² δa(θ) δb(θ)``,
  so the finite step departs from the exact preconditioned step ``−η δW`` by
  ``η² δa δb``, and that second-order term is the *only* part of the weight
  update that depends on θ (the optimizer is gauge invariant, so the next
  steps depend on the factors only through ``W``).
* The best balanced split ``θ°``: the member whose finite step stays closest
  to the exact step, ``θ° = argmin_{θ ∈ [0, 1]} ‖δa(θ) δb(θ)‖_H`` (the
  admissible interval of ``docs/design.md`` §4), found by brute force: dense
  grid plus two zooms of the exactly evaluated quartic. It is the best member
  of the θ-line, not of the whole r²-dimensional gauge family. We also record
  how often the unconstrained minimizer on [−1, 2] leaves [0, 1].
* H-norm deviation of a rule's factor update from the best split::

    deviation = sqrt(‖(δa_rule − δa°) b‖²_H + ‖a (δb_rule − δb°)‖²_H) / ‖δW‖_H

  (each factor's change measured by its contribution to ``W``, relative to the
  exact preconditioned step; for a member of the θ-line it equals
  ``√2 |θ_rule − θ°| ‖aNb‖_H / ‖δW‖_H``). In float64 it is computed from the
  rule's own factor update, so that ``min_imbalance``, which is defined over
  the whole gauge family rather than on the θ-line, is measured rather than
  assumed to sit at θ = ½.
* Excess second-order error: ``‖δa_rule δb_rule‖_H / ‖δa° δb°‖_H − 1``, how
  much farther than the best member the rule's finite step strays, for every η.
* ``clipped_fraction`` (``equal_norms`` only): how often its θ is clipped to
  an end of [0, 1].

Sweep: magnitude ratio ``ρ = geomean(p)/geomean(q)`` and per-factor condition
number ``κ = max/min`` of ``p`` and of ``q`` (so cond(H) = κ²), each 1 … 1e8,
many random pairs per cell; the gradient is Adafactor-consistent,
``G = diag(p) Z diag(q)`` with Gaussian ``Z``. The same pairs are used for
every ρ, so exactly ρ-invariant rules give identical rows. Each rule's θ is
also computed in float32 (as in training) and scored as that member of the
float64 θ-line (``min_imbalance`` reports θ = ½, the member it equals here).

Training effect: LoRA (rank 4) on a linear digit classifier (scikit-learn
digits, a ridge fit on digits 0-4 as the frozen base, adapted to all ten
digits), with the LoRA layer's input features and output units rescaled by
fixed diagonals of condition κ (the frozen weight compensates, so the task is
the same) and the loss scaled by 1/ρ (``p`` is normalized by Adafactor, so
the gradient scale sets the magnitude ratio). Exact statistics come from
``adaprelora_jax.nn.lora_product``. Per setting and tie-breaker: final
training loss, test accuracy, and the realized H-norm deviation of each step
from its first-order part, ``‖u_a u_b‖_H / ‖u_a b + a u_b‖_H``.

Usage::

  python -m experiments.tiebreak_bias            # full: ~6 min on 2 busy cores
  python -m experiments.tiebreak_bias --quick    # smoke run, ~1-2 min (compilation)

Writes ``experiments/results/tiebreak_bias.json`` and ``tiebreak_bias.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaprelora_jax as ap
from experiments.paths import RESULTS
from experiments.tasks.base import example_order
from experiments.tasks.digits import digits_split

RULES: tuple[str, ...] = ap.TIE_BREAKERS
DEFAULT_RULE = "min_imbalance"  # the paper's rule, ap.adaprelora's default
CLAIM = 0.04  # the authors' bound on the H-norm deviation
CLAIM_CONDITION = 1e4
CLAIM_RATIO = 1e2


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of one run of the study.

  Attributes:
    conditions: per-factor condition numbers κ of the synthetic sweep.
    ratios: magnitude ratios ρ of the synthetic sweep.
    pairs: random pairs per (κ, ρ) cell.
    shape: (d_in, d_out, rank) of the synthetic pairs.
    grid: points of the brute-force θ grid on [−1, 2] (before zooming).
    train_conditions: κ of the training runs.
    train_ratios: ρ of the training runs.
    learning_rates: learning rates of the training runs.
    seeds: seeds (LoRA init and data order) per training setting.
    steps: optimizer steps per training run.
    rank: LoRA rank of the training runs.
    fast_compile: compile with XLA's backend optimizations off (the quick
      smoke run is dominated by compilation; the full run by execution).
  """

  conditions: tuple[float, ...]
  ratios: tuple[float, ...]
  pairs: int
  shape: tuple[int, int, int]
  grid: int
  train_conditions: tuple[float, ...]
  train_ratios: tuple[float, ...]
  learning_rates: tuple[float, ...]
  seeds: int
  steps: int
  rank: int = 4
  fast_compile: bool = False

  def jit(self, fn, **kwargs):
    """``jax.jit`` with this preset's compiler options."""
    if self.fast_compile:
      kwargs["compiler_options"] = {"xla_backend_optimization_level": 0}
    return jax.jit(fn, **kwargs)


DECADES = tuple(10.0**k for k in range(9))
PRESETS: dict[str, Config] = {
  "full": Config(
    conditions=DECADES,
    ratios=DECADES,
    pairs=1024,
    shape=(48, 32, 4),
    grid=3001,
    train_conditions=(1.0, 1e2, 1e4, 1e6, 1e8),
    train_ratios=(1.0, 1e4, 1e8),
    learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    seeds=3,
    steps=300,
  ),
  "quick": Config(
    conditions=(1.0, 1e8),
    ratios=(1.0, 1e8),
    pairs=8,
    shape=(12, 8, 2),
    grid=301,
    train_conditions=(1.0, 1e4),
    train_ratios=(1.0, 1e8),
    learning_rates=(3e-2,),
    seeds=1,
    steps=10,
    fast_compile=True,
  ),
}
BATCH = 64


@functools.partial(jax.jit, static_argnames="size")
def condition_scales(key: jax.Array, size: int, condition: jax.typing.ArrayLike) -> jax.Array:
  """Positive scales, geometric mean ~1, ``max/min = condition`` exactly.

  Log-uniform in ``[condition^(−½), condition^(½)]`` with both ends present.
  """
  half_log = 0.5 * jnp.log(condition)
  logs = jax.random.uniform(key, (size,), minval=-1.0, maxval=1.0)
  logs = logs.at[0].set(-1.0).at[1].set(1.0)
  return jnp.exp(half_log * jax.random.permutation(jax.random.fold_in(key, 1), logs))


# --------------------------------------------------------------------------
# Synthetic sweep: rules against the brute-force best split (float64).
# --------------------------------------------------------------------------


def random_problem(key, condition, ratio, shape):
  """One pair ``(a, b, g_a, g_b, p, q)`` with Adafactor-consistent ``G``."""
  d_in, d_out, rank = shape
  keys = jax.random.split(key, 5)
  a = jax.random.normal(keys[0], (d_in, rank))
  b = jax.random.normal(keys[1], (rank, d_out))
  p = jnp.sqrt(ratio) * condition_scales(keys[2], d_in, condition)
  q = condition_scales(keys[3], d_out, condition) / jnp.sqrt(ratio)
  grad_w = p[:, None] * jax.random.normal(keys[4], (d_in, d_out)) * q[None, :]
  return a, b, grad_w @ b.T, a.T @ grad_w, p, q


def family_ends(a, b, g_a, g_b, p, q):
  """Members θ = 0 and θ = 1 of the family, from docs/design.md §3 with pinv.

  Written out independently of :func:`adaprelora_jax.factor_step`, so that the
  reference does not share the implementation it checks.
  """
  inverse_a = jnp.linalg.pinv(a.T @ (p[:, None] * a), hermitian=True)
  inverse_b = jnp.linalg.pinv((b * q) @ b.T, hermitian=True)
  shared = a.T @ g_a
  x_a = (g_a / p[:, None]) @ inverse_b
  x_b = inverse_a @ (g_b / q[None, :])
  core = inverse_a @ shared @ inverse_b
  return (x_a, x_b - core @ b), (x_a - a @ core, x_b)


def h_inner(x, y, p, q):
  return jnp.sum(p[:, None] * x * y * q[None, :])


def _grid_min(values_fn, low, high, points, zooms=2):
  """argmin of ``values_fn`` on [low, high]: a dense grid, then zooms."""
  thetas = jnp.linspace(low, high, points)
  for _ in range(zooms + 1):
    best = thetas[jnp.argmin(values_fn(thetas))]
    spacing = thetas[1] - thetas[0]
    thetas = jnp.linspace(
      jnp.maximum(best - 2 * spacing, low), jnp.minimum(best + 2 * spacing, high), 101
    )
  return best


def pair_metrics(problem, grid: int) -> dict[str, Any]:
  """Every rule's θ, deviation and excess second-order error on one pair."""
  a, b, g_a, g_b, p, q = problem
  (a0, b0), (a1, b1) = family_ends(*problem)
  slope_a, slope_b = a1 - a0, b1 - b0
  # δa(θ) δb(θ) = C0 + θ C1 + θ² C2, evaluated densely (d_in × d_out).
  c = (a0 @ b0, a0 @ slope_b + slope_a @ b0, slope_a @ slope_b)
  inner = jnp.asarray([[h_inner(ci, cj, p, q) for cj in c] for ci in c])

  def second_order(thetas):
    powers = thetas[..., None] ** jnp.arange(3)
    return jnp.einsum("...i,ij,...j->...", powers, inner, powers)

  best = _grid_min(second_order, 0.0, 1.0, grid)
  unconstrained = _grid_min(second_order, -1.0, 2.0, grid)
  best_a, best_b = a0 + best * slope_a, b0 + best * slope_b

  def h_norm(x):
    return jnp.sqrt(h_inner(x, x, p, q))

  step_norm = h_norm(a0 @ b + a @ b0)
  best_error = jnp.sqrt(second_order(best))

  def scores(theta, delta_a, delta_b):
    error_a, error_b = (delta_a - best_a) @ b, a @ (delta_b - best_b)
    return {
      "theta": theta,
      "deviation": jnp.sqrt(h_inner(error_a, error_a, p, q) + h_inner(error_b, error_b, p, q))
      / step_norm,
      "excess": h_norm(delta_a @ delta_b) / best_error - 1.0,
    }

  metrics = {"best_theta": best, "outside_unit_interval": (unconstrained < 0) | (unconstrained > 1)}
  for rule in RULES:
    step = ap.factor_step(*problem, tie_breaker=rule, pseudo_inverse=True)
    metrics[f"{rule}/float64"] = scores(step.theta, step.delta_a, step.delta_b)
    # float32 factors would add their own rounding (cond H reaches 1e16 here);
    # the float32 θ is scored as a member of the exact line, to isolate the
    # rule's choice from the rest of the step's arithmetic.
    step = ap.factor_step(
      *(x.astype(jnp.float32) for x in problem), tie_breaker=rule, pseudo_inverse=True
    )
    theta = step.theta.astype(jnp.float64)
    metrics[f"{rule}/float32"] = scores(theta, a0 + theta * slope_a, b0 + theta * slope_b)
  return metrics


def _summary(values: np.ndarray) -> dict[str, float]:
  return {
    "mean": float(np.mean(values)),
    "median": float(np.median(values)),
    "p90": float(np.quantile(values, 0.9)),
    "max": float(np.max(values)),
  }


def run_sweep(config: Config, seed: int = 0) -> dict[str, Any]:
  """The (κ, ρ) sweep; summaries are nested lists indexed [κ][ρ]."""
  with jax.enable_x64(True):

    def cell(key, condition, ratio):
      keys = jax.random.split(key, config.pairs)
      problems = jax.vmap(lambda k: random_problem(k, condition, ratio, config.shape))(keys)
      return jax.vmap(lambda problem: pair_metrics(problem, config.grid))(problems)

    cell = config.jit(cell)

    cells = [
      [
        jax.tree.map(
          np.asarray, cell(jax.random.fold_in(jax.random.key(seed), i), condition, ratio)
        )
        for ratio in config.ratios
      ]
      for i, condition in enumerate(config.conditions)
    ]
  rules = {}
  for name in cells[0][0]:
    if "/" not in name:
      continue
    rules[name] = {
      metric: {
        stat: [[_summary(c[name][metric])[stat] for c in row] for row in cells]
        for stat in ("mean", "median", "p90", "max")
      }
      for metric in ("deviation", "excess")
    }
    if name.startswith("equal_norms/"):
      rules[name]["clipped_fraction"] = [
        [float(np.mean((c[name]["theta"] <= 0) | (c[name]["theta"] >= 1))) for c in row]
        for row in cells
      ]
  return {
    "conditions": list(config.conditions),
    "ratios": list(config.ratios),
    "pairs_per_cell": config.pairs,
    "shape": list(config.shape),
    "best_theta_median": [[float(np.median(c["best_theta"])) for c in row] for row in cells],
    "unconstrained_optimum_outside_unit_interval": float(
      np.mean([c["outside_unit_interval"] for row in cells for c in row])
    ),
    "rules": rules,
  }


# --------------------------------------------------------------------------
# Training effect: LoRA on a rescaled linear digit classifier (float32).
# --------------------------------------------------------------------------


def digits_regression(ridge: float = 1.0):
  """Standardized digits, and the frozen base: a ridge fit on digits 0-4."""
  (x, y), (x_test, y_test) = digits_split(tuple(range(10)))
  keep = x.std(axis=0) > 0
  mean, std = x[:, keep].mean(axis=0), x[:, keep].std(axis=0)
  x, x_test = ((v[:, keep] - mean) / std for v in (x, x_test))
  source = y < 5
  targets = np.eye(10)[y[source]]
  gram = x[source].T @ x[source] + ridge * np.eye(x.shape[1])
  base = np.linalg.solve(gram, x[source].T @ targets)
  return (x.astype(np.float32), y), (x_test.astype(np.float32), y_test), base.astype(np.float32)


def _logits(params, x, in_scale, out_scale, base):
  # The LoRA layer sees features x·D and produces units ·E; the frozen weight
  # D⁻¹ W0 E compensates, so W = D (W̃0 + ab) E⁻¹ is the same classifier and
  # G̃ = D G E⁻¹ has row/column scales of condition ~κ.
  features = x * in_scale
  lora = ap.nn.lora_product(
    features, params["lora_a"], params["lora_b"], params["grad_sq_rows"], params["grad_sq_cols"]
  )
  frozen = base / in_scale[:, None] * out_scale[None, :]
  return (features @ frozen + lora) / out_scale


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_runs(
  config: Config, tie_breaker: str, settings: dict[str, np.ndarray], data
) -> dict[str, np.ndarray]:
  """All runs of one tie-breaker, vmapped; one entry per run in each output."""
  (x, y), (x_test, y_test), base = data
  x, y, x_test, y_test, base = map(jnp.asarray, (x, y, x_test, y_test, base))
  d_in, classes = base.shape

  def single(in_scale, out_scale, loss_scale, learning_rate, seed, batches):
    tx = ap.adaprelora(learning_rate, tie_breaker=tie_breaker)
    params = {
      "lora_a": jax.random.normal(jax.random.key(seed), (d_in, config.rank)) / jnp.sqrt(d_in),
      "lora_b": jnp.zeros((config.rank, classes)),
      "grad_sq_rows": jnp.zeros(d_in),
      "grad_sq_cols": jnp.zeros(classes),
    }

    def loss_fn(params, index):
      logits = _logits(params, x[index], in_scale, out_scale, base)
      return loss_scale * _cross_entropy(logits, y[index])

    def step(carry, index):
      params, state = carry
      grads = jax.grad(loss_fn)(params, index)
      updates, state = tx.update(grads, state, params)
      rows, cols = ap.second_moments(state, params)
      p, q = ap.factored_scales(rows["lora_a"], cols["lora_b"])
      a, b, u_a, u_b = params["lora_a"], params["lora_b"], updates["lora_a"], updates["lora_b"]
      first = u_a @ b + a @ u_b
      second = u_a @ u_b
      deviation = jnp.sqrt(
        h_inner(second, second, p, q)
        / jnp.maximum(h_inner(first, first, p, q), jnp.finfo(p.dtype).tiny)
      )
      stats = {
        "deviation": deviation,
        "condition_p": p.max() / p.min(),
        "condition_q": q.max() / q.min(),
        "ratio": jnp.sqrt(jnp.mean(p**2) / jnp.mean(q**2)),
      }
      return (optax.apply_updates(params, updates), state), stats

    (params, _), stats = jax.lax.scan(step, (params, tx.init(params)), batches)
    test_logits = _logits(params, x_test, in_scale, out_scale, base)
    return {
      "train_loss": _cross_entropy(_logits(params, x, in_scale, out_scale, base), y),
      "test_accuracy": jnp.mean(jnp.argmax(test_logits, -1) == y_test),
      # Step 0 has b = 0 (u_a = 0): no second-order term; average the rest.
      "deviation_mean": jnp.mean(stats["deviation"][1:]),
      "deviation_max": jnp.max(stats["deviation"][1:]),
      "condition_p": jnp.median(stats["condition_p"]),
      "condition_q": jnp.median(stats["condition_q"]),
      "ratio": jnp.median(stats["ratio"]),
    }

  outputs = config.jit(jax.vmap(single))(
    *(
      jnp.asarray(settings[k])
      for k in ("in_scale", "out_scale", "loss_scale", "learning_rate", "seed", "batches")
    )
  )
  return jax.tree.map(np.asarray, outputs)


def training_settings(config: Config, num_examples: int, d_in: int, classes: int):
  """Every (κ, ρ, lr, seed) run as stacked arrays, plus its grid indices."""
  grid = [
    (i, j, k, seed)
    for i in range(len(config.train_conditions))
    for j in range(len(config.train_ratios))
    for k in range(len(config.learning_rates))
    for seed in range(config.seeds)
  ]
  key = jax.random.key(1234)
  scales = {
    i: (
      np.asarray(condition_scales(jax.random.fold_in(key, 2 * i), d_in, kappa)),
      np.asarray(condition_scales(jax.random.fold_in(key, 2 * i + 1), classes, kappa)),
    )
    for i, kappa in enumerate(config.train_conditions)
  }
  batches = {
    seed: np.stack([example_order(num_examples, seed, step, BATCH) for step in range(config.steps)])
    for seed in range(config.seeds)
  }
  settings = {
    "in_scale": np.stack([scales[i][0] for i, *_ in grid]).astype(np.float32),
    "out_scale": np.stack([scales[i][1] for i, *_ in grid]).astype(np.float32),
    "loss_scale": np.asarray([1.0 / config.train_ratios[j] for _, j, _, _ in grid], np.float32),
    "learning_rate": np.asarray([config.learning_rates[k] for *_, k, _ in grid], np.float32),
    "seed": np.asarray([seed for *_, seed in grid], np.int32),
    "batches": np.stack([batches[seed] for *_, seed in grid]),
  }
  return grid, settings


def run_training(config: Config) -> dict[str, Any]:
  """Final loss/accuracy and realized deviation per (rule, κ, ρ, lr), over seeds."""
  data = digits_regression()
  (x, _), _, base = data
  grid, settings = training_settings(config, len(x), *base.shape)
  shape = (
    len(config.train_conditions),
    len(config.train_ratios),
    len(config.learning_rates),
    config.seeds,
  )
  rules = {}
  for rule in RULES:
    outputs = train_runs(config, rule, settings, data)
    per_run = {name: np.full(shape, np.nan) for name in outputs}
    for index, cell in enumerate(grid):
      for name, values in outputs.items():
        per_run[name][cell] = values[index]
    rules[rule] = {
      name: {"mean": np.mean(values, axis=-1).tolist(), "std": np.std(values, axis=-1).tolist()}
      for name, values in per_run.items()
    }
  return {
    "task": f"LoRA rank {config.rank} on a linear digits classifier (ridge base on "
    "digits 0-4, all ten digits; features/units rescaled by condition κ, loss "
    "by 1/ρ)",
    "conditions": list(config.train_conditions),
    "ratios": list(config.train_ratios),
    "learning_rates": list(config.learning_rates),
    "seeds": config.seeds,
    "steps": config.steps,
    "batch": BATCH,
    "layout": "values[κ][ρ][lr] (mean and std over seeds)",
    "rules": rules,
  }


# --------------------------------------------------------------------------
# The answer, the figure, the CLI.
# --------------------------------------------------------------------------


def claim_check(sweep: dict[str, Any]) -> dict[str, Any]:
  """Worst mean deviation per rule inside the authors' range (κ ≤ 1e4, ρ ≤ 100)."""
  rows = [i for i, kappa in enumerate(sweep["conditions"]) if kappa <= CLAIM_CONDITION]
  cols = [j for j, ratio in enumerate(sweep["ratios"]) if ratio <= CLAIM_RATIO]
  check = {}
  for name, rule in sweep["rules"].items():
    mean = np.asarray(rule["deviation"]["mean"])
    worst = float(mean[np.ix_(rows, cols)].max())
    # ρ-invariance: largest change of the mean deviation along ρ.
    spread = float(np.max(mean.max(axis=1) - mean.min(axis=1)))
    check[name] = {
      "worst_mean_deviation_in_claimed_range": worst,
      "within_claim": worst < CLAIM,
      "mean_deviation_at_isotropic_scales": float(mean[0, 0]),
      "largest_change_along_ratio": spread,
    }
  return check


def training_summary(training: dict[str, Any]) -> dict[str, Any]:
  """Per rule and (κ, ρ): its best learning rate (lowest mean final loss) and
  the final loss, accuracy and realized deviation there; values[κ][ρ]."""
  summary = {}
  for rule, outputs in training["rules"].items():
    loss = np.asarray(outputs["train_loss"]["mean"])
    best = np.argmin(loss, axis=-1)

    def at_best(name, outputs=outputs, best=best):
      values = np.asarray(outputs[name]["mean"])
      return np.take_along_axis(values, best[..., None], axis=-1)[..., 0].tolist()

    summary[rule] = {
      "best_learning_rate": np.asarray(training["learning_rates"])[best].tolist(),
      **{
        name: at_best(name)
        for name in ("train_loss", "test_accuracy", "deviation_mean", "deviation_max")
      },
    }
  return summary


def plot(results: dict[str, Any], path: Path) -> None:
  """The study's figure (six panels)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel

  sweep, training = results["sweep"], results["training"]
  conditions, ratios = np.asarray(sweep["conditions"]), np.asarray(sweep["ratios"])
  rules = sweep["rules"]
  colors = {
    "min_imbalance": "C0",
    "equal_norms": "C4",
    "half": "C2",
    "factor_norm": "C3",
    "second_order": "C1",
  }
  # half gives the default's step on this study's consistent gradients: the
  # default is drawn wide underneath, so that both curves stay visible.
  widths = {rule: 4.0 if rule == DEFAULT_RULE else 1.3 for rule in RULES}
  fig, axes = plt.subplots(2, 3, figsize=(16, 9))
  norm = LogNorm(1e-3, 10.0)
  for axis, rule in zip(axes[0, :2], (DEFAULT_RULE, "factor_norm"), strict=True):
    values = np.maximum(np.asarray(rules[f"{rule}/float64"]["deviation"]["mean"]), 1e-3)
    image = axis.imshow(values, origin="lower", cmap="magma", norm=norm, aspect="auto")
    axis.set_xticks(range(len(ratios)), [f"{np.log10(r):.0f}" for r in ratios])
    axis.set_yticks(range(len(conditions)), [f"{np.log10(c):.0f}" for c in conditions])
    axis.set_xlabel("log10 magnitude ratio ρ = p/q")
    axis.set_ylabel("log10 condition κ of p and of q")
    axis.set_title(f"{rule}: mean H-norm deviation from the best split", fontsize=10)
    fig.colorbar(image, ax=axis)
  axis = axes[0, 2]
  for rule in RULES:
    for dtype, style in (("float64", "-"), ("float32", ":")):
      values = np.asarray(rules[f"{rule}/{dtype}"]["deviation"]["mean"])[:, 0]
      axis.loglog(
        conditions,
        np.maximum(values, 1e-6),
        style,
        color=colors[rule],
        linewidth=widths[rule],
        marker="o" if dtype == "float64" else None,
        markersize=3,
        label=f"{rule} ({dtype})",
      )
  axis.axhline(CLAIM, color="k", linestyle="--", linewidth=0.8, label="4 % claim")
  axis.axvline(CLAIM_CONDITION, color="0.6", linewidth=0.8)
  axis.set_xlabel("condition κ (ρ = 1)")
  axis.set_ylabel("mean deviation")
  axis.set_title("deviation from the best split vs κ")
  axis.legend(fontsize=7, ncol=2)
  axis = axes[1, 0]
  for rule in RULES:
    values = np.asarray(rules[f"{rule}/float64"]["excess"]["median"])[:, 0]
    axis.loglog(
      conditions,
      np.maximum(values, 1e-6),
      "-o",
      markersize=3,
      color=colors[rule],
      linewidth=widths[rule],
      label=rule,
    )
  axis.set_xlabel("condition κ (ρ = 1)")
  axis.set_ylabel("median ‖δaδb‖_H / best − 1")
  axis.set_title("excess second-order error of the finite step")
  axis.legend(fontsize=8)
  axis = axes[1, 1]
  shown = range(0, len(conditions), max(1, len(conditions) // 3))
  # Shades of factor_norm's color, so that no curve reads as another rule.
  for shade, i in zip(np.linspace(0.4, 1.0, len(shown)), shown, strict=True):
    values = np.asarray(rules["factor_norm/float64"]["deviation"]["mean"])[i]
    axis.semilogx(
      ratios,
      values,
      "-o",
      markersize=3,
      color=plt.get_cmap("Reds")(shade),
      label=f"factor_norm, κ = {conditions[i]:g}",
    )
  axis.semilogx(
    ratios,
    np.asarray(rules[f"{DEFAULT_RULE}/float64"]["deviation"]["mean"])[0],
    "k--",
    label=f"{DEFAULT_RULE}, κ = 1 (exactly flat)",
  )
  axis.set_xlabel("magnitude ratio ρ")
  axis.set_ylabel("mean deviation")
  axis.set_title("bias from the magnitude ratio")
  axis.legend(fontsize=8)
  axis = axes[1, 2]
  train_conditions = np.asarray(training["conditions"])
  summary = training_summary(training)
  reference = np.asarray(summary[DEFAULT_RULE]["train_loss"])
  for rule in RULES:
    loss = np.asarray(summary[rule]["train_loss"])
    for j, style in ((0, "-o"), (len(training["ratios"]) - 1, ":x")):
      if j and rule != "factor_norm":
        continue  # the other rules are exactly ρ-invariant up to float32 rounding
      axis.semilogx(
        train_conditions,
        100 * (loss[:, j] / reference[:, j] - 1),
        style,
        color=colors[rule],
        linewidth=widths[rule],
        markersize=4,
        label=f"{rule}, ρ = {training['ratios'][j]:g}",
      )
  axis.set_xlabel("condition κ of the rescaling")
  axis.set_ylabel(f"final loss vs {DEFAULT_RULE} (%), each at its best lr")
  axis.set_title("training: final loss relative to the default rule")
  axis.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke-sized run")
  parser.add_argument(
    "--output",
    type=Path,
    default=None,
    help="results JSON (default experiments/results/tiebreak_bias.json; "
    "the figure goes next to it)",
  )
  args = parser.parse_args(argv)
  preset = "quick" if args.quick else "full"
  config = PRESETS[preset]
  output = args.output or RESULTS / "tiebreak_bias.json"
  start = time.perf_counter()
  sweep = run_sweep(config)
  sweep_seconds = time.perf_counter() - start
  training = run_training(config)
  results = {
    "preset": preset,
    "config": dataclasses.asdict(config),
    "claim": {"deviation": CLAIM, "max_condition": CLAIM_CONDITION, "max_ratio": CLAIM_RATIO},
    "claim_check": claim_check(sweep),
    "sweep": sweep,
    "training": training,
    "training_summary": training_summary(training),
    "seconds": {"sweep": sweep_seconds, "total": time.perf_counter() - start},
    "environment": {
      "jax": jax.__version__,
      "optax": optax.__version__,
      "backend": jax.default_backend(),
      "machine": platform.machine(),
      "python": platform.python_version(),
    },
  }
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(results, indent=1))
  plot(results, output.with_suffix(".png"))
  for name, check in results["claim_check"].items():
    print(
      f"{name:22s} worst mean deviation (κ ≤ 1e4, ρ ≤ 100): "
      f"{check['worst_mean_deviation_in_claimed_range']:.3g}  isotropic: "
      f"{check['mean_deviation_at_isotropic_scales']:.3g}  change along ρ: "
      f"{check['largest_change_along_ratio']:.2g}"
    )
  print(f"wrote {output} and {output.with_suffix('.png')} in {results['seconds']['total']:.0f} s")
  return results


if __name__ == "__main__":
  main()
