"""Slow, independent numpy float64 references for the AdaPreLoRA maths.

Nothing here imports the package: the oracles are built from the definitions
(dense Jacobians, explicit projection matrices, brute-force searches), so a
shared mistake cannot make implementation and reference agree.
"""

from __future__ import annotations

import numpy as np


def lora_jacobian(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Dense Jacobian of (a, b) ↦ vec(a @ b), columns for vec(δa) then vec(δb)."""
  d_in, rank = a.shape
  d_out = b.shape[1]
  columns = []
  for k in range(d_in * rank):
    unit = np.zeros(d_in * rank)
    unit[k] = 1.0
    columns.append((unit.reshape(d_in, rank) @ b).ravel())
  for k in range(rank * d_out):
    unit = np.zeros(rank * d_out)
    unit[k] = 1.0
    columns.append((a @ unit.reshape(rank, d_out)).ravel())
  return np.stack(columns, axis=1)


def h_projection(a, b, grad_w, row_scale, col_scale) -> np.ndarray:
  """δW of min ‖J d − H⁻¹G‖_H by dense weighted least squares.

  ``H[X] = diag(p) X diag(q)``, so ``‖X‖²_H = Σ p_i q_j X_ij²``.
  """
  jacobian = lora_jacobian(a, b)
  weights = np.outer(row_scale, col_scale)
  sqrt_h = np.sqrt(weights).ravel()
  target = (grad_w / weights).ravel()
  solution, *_ = np.linalg.lstsq(sqrt_h[:, None] * jacobian, sqrt_h * target, rcond=None)
  return (jacobian @ solution).reshape(grad_w.shape)


def h_norm_sq(x, row_scale, col_scale) -> float:
  return float(np.sum(np.outer(row_scale, col_scale) * x * x))


def solution_family(a, b, grad_a, grad_b, row_scale, col_scale, theta):
  """The θ-family of docs/design.md §3 with numpy pseudo-inverses."""
  gram_a = a.T @ np.diag(row_scale) @ a
  gram_b = b @ np.diag(col_scale) @ b.T
  inv_a, inv_b = np.linalg.pinv(gram_a), np.linalg.pinv(gram_b)
  shared = a.T @ grad_a
  delta_a = (np.diag(1.0 / row_scale) @ grad_a - theta * a @ inv_a @ shared) @ inv_b
  delta_b = inv_a @ (grad_b @ np.diag(1.0 / col_scale) - (1.0 - theta) * shared @ inv_b @ b)
  return delta_a, delta_b


def brute_force_theta(
  a, b, grad_a, grad_b, row_scale, col_scale, criterion, grid: int = 20001
) -> float:
  """θ ∈ [0, 1] minimizing |criterion| evaluated on a dense grid.

  ``criterion(delta_a, delta_b) -> float`` is the signed imbalance (or a
  non-negative quantity to minimize).
  """
  thetas = np.linspace(0.0, 1.0, grid)
  # The family is affine in θ: evaluate it from its members at θ = 0 and 1.
  a0, b0 = solution_family(a, b, grad_a, grad_b, row_scale, col_scale, 0.0)
  a1, b1 = solution_family(a, b, grad_a, grad_b, row_scale, col_scale, 1.0)
  values = []
  for theta in thetas:
    delta_a, delta_b = (1 - theta) * a0 + theta * a1, (1 - theta) * b0 + theta * b1
    values.append(abs(criterion(delta_a, delta_b)))
  values = np.asarray(values)
  best = values.min()
  # Ties (e.g. a flat criterion): prefer the θ closest to ½, like the rule.
  candidates = thetas[values <= best + 1e-12 * max(1.0, values.max())]
  return float(candidates[np.argmin(np.abs(candidates - 0.5))])


def min_imbalance_member(a, b, grad_a, grad_b, row_scale, col_scale):
  """The paper's gauge rule by brute force (docs/design.md §4).

  Least squares over all ``X ∈ R^{r×r}`` of the explicit H-weighted
  ``‖(δa0 + aX) b − a (δb0 − Xb)‖_H`` from the θ = 0 member ``(δa0, δb0)``,
  with the linear map ``X ↦ 2 a X b`` built column by column from unit ``X``.
  """
  rank = a.shape[1]
  delta_a, delta_b = solution_family(a, b, grad_a, grad_b, row_scale, col_scale, 0.0)
  sqrt_h = np.sqrt(np.outer(row_scale, col_scale)).ravel()
  columns = []
  for k in range(rank * rank):
    unit = np.zeros(rank * rank)
    unit[k] = 1.0
    columns.append(sqrt_h * (2.0 * a @ unit.reshape(rank, rank) @ b).ravel())
  target = -sqrt_h * (delta_a @ b - a @ delta_b).ravel()
  solution, *_ = np.linalg.lstsq(np.stack(columns, axis=1), target, rcond=None)
  gauge = solution.reshape(rank, rank)
  return delta_a + a @ gauge, delta_b - gauge @ b


def consistent_projection(a, b, grad_a, grad_b):
  """Euclidean projection of (g_a, g_b) onto the orthogonal complement of null(J).

  The null space of the dense Jacobian comes from its SVD; the gauge
  component is removed by a dense orthogonal projection.
  """
  jacobian = lora_jacobian(a, b)
  _, singular, vt = np.linalg.svd(jacobian)
  tolerance = max(jacobian.shape) * np.finfo(float).eps * singular.max()
  null = vt[np.sum(singular > tolerance) :].T
  flat = np.concatenate([grad_a.ravel(), grad_b.ravel()])
  projected = flat - null @ (null.T @ flat)
  return (
    projected[: grad_a.size].reshape(grad_a.shape),
    projected[grad_a.size :].reshape(grad_b.shape),
  )


def contribution_imbalance(a, b, row_scale, col_scale):
  """‖δa b‖²_H − ‖a δb‖²_H (the equal-norms rule's criterion, docs/design.md §4)."""

  def criterion(delta_a, delta_b):
    return h_norm_sq(delta_a @ b, row_scale, col_scale) - h_norm_sq(
      a @ delta_b, row_scale, col_scale
    )

  return criterion


def factor_norm_imbalance(row_scale, col_scale):
  """Σ p_i δa_ik² − Σ q_j δb_kj² (the factor-norm variant)."""

  def criterion(delta_a, delta_b):
    return float(np.sum(row_scale[:, None] * delta_a**2)) - float(
      np.sum(col_scale[None, :] * delta_b**2)
    )

  return criterion


def second_order_term(row_scale, col_scale):
  """‖δa δb‖²_H, the second-order part of a finite step's weight change."""

  def criterion(delta_a, delta_b):
    return h_norm_sq(delta_a @ delta_b, row_scale, col_scale)

  return criterion


def tangent_projection(a, b, grad_w) -> np.ndarray:
  """Ĝ = P_a G + G P_b − P_a G P_b with explicit (pseudo-inverse) projectors."""
  proj_a = a @ np.linalg.pinv(a)
  proj_b = np.linalg.pinv(b) @ b
  return proj_a @ grad_w + grad_w @ proj_b - proj_a @ grad_w @ proj_b


def tangent_split_statistics(a, b, grad_a, grad_b):
  """Row and column means of the squared tangent estimate, part by part.

  For factor gradients of one ``G``: ``Ĝ = G P_b + P_a G (I − P_b)``, whose
  parts have orthogonal rows, and ``Ĝ = P_a G + (I − P_a) G P_b``, whose parts
  have orthogonal columns. Written with ``G P_b = g_a (bbᵀ)⁺ b`` and
  ``P_a G = a (aᵀa)⁺ g_b``, the parts are defined for any factor gradients;
  the statistics are the sums of the parts' squared row (column) norms.
  """
  proj_a = a @ np.linalg.pinv(a)
  proj_b = np.linalg.pinv(b) @ b
  grad_proj_b = grad_a @ np.linalg.pinv(b @ b.T) @ b
  proj_a_grad = a @ np.linalg.pinv(a.T @ a) @ grad_b
  eye_a, eye_b = np.eye(a.shape[0]), np.eye(b.shape[1])
  rows = np.sum(grad_proj_b**2, axis=1) + np.sum((proj_a_grad @ (eye_b - proj_b)) ** 2, axis=1)
  cols = np.sum(proj_a_grad**2, axis=0) + np.sum(((eye_a - proj_a) @ grad_proj_b) ** 2, axis=0)
  return rows / b.shape[1], cols / a.shape[0]


def surrogate_gradient(a, b, grad_a, grad_b) -> np.ndarray:
  """The paper's rank-2r surrogate of G, ``G̃ = g_a b + a g_b``, formed densely."""
  return grad_a @ b + a @ grad_b


def adafactor_scales(row_moment, col_moment):
  """p, q with p_i q_j = sqrt(v_row_i v_col_j / mean(v_row)) (Adafactor V̂)."""
  return np.sqrt(row_moment / row_moment.mean()), np.sqrt(col_moment)


def adafactor_beta2(step: int, decay_rate: float = 0.8) -> float:
  return 1.0 - (step + 1.0) ** (-decay_rate)


def random_pair(rng, d_in, d_out, rank, *, factor_condition=1.0):
  """Random a, b with singular values spread over ``factor_condition``."""

  def factor(rows, cols):
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    k = min(rows, cols)
    singular = np.geomspace(1.0, 1.0 / factor_condition, k)
    return u[:, :k] @ np.diag(singular) @ v[:k, :]

  return factor(d_in, rank), factor(rank, d_out)


def random_scales(rng, size, condition):
  """Positive scales with max/min = condition (log-uniform in between)."""
  log_values = rng.uniform(0.0, np.log(condition), size)
  log_values[0], log_values[-1] = 0.0, np.log(condition)
  return np.exp(rng.permutation(log_values))


def adaprelora_step(
  a,
  b,
  grad_w,
  row_moment,
  col_moment,
  step,
  *,
  statistics="exact",
  clipping_threshold=1.0,
  decay_rate=0.8,
  eps=1e-30,
):
  """One undamped AdaPreLoRA step from the definitions (docs/design.md §2-§5).

  Returns ``(delta_a, delta_b, new_row_moment, new_col_moment)``.
  """
  observed = {
    "exact": lambda: grad_w,
    "tangent": lambda: tangent_projection(a, b, grad_w),
    "surrogate": lambda: surrogate_gradient(a, b, grad_w @ b.T, a.T @ grad_w),
  }[statistics]()
  beta2 = adafactor_beta2(step, decay_rate)
  new_row = beta2 * row_moment + (1 - beta2) * np.mean(observed**2 + eps, axis=1)
  new_col = beta2 * col_moment + (1 - beta2) * np.mean(observed**2 + eps, axis=0)
  p, q = adafactor_scales(new_row, new_col)
  grad_a, grad_b = grad_w @ b.T, a.T @ grad_w
  delta_a, delta_b = min_imbalance_member(a, b, grad_a, grad_b, p, q)
  if clipping_threshold is not None:
    delta_w = h_projection(a, b, grad_w, p, q)
    rms = np.sqrt(h_norm_sq(delta_w, p, q) / (p.sum() * q.sum()))
    scale = 1.0 / max(1.0, rms / clipping_threshold)
    delta_a, delta_b = delta_a * scale, delta_b * scale
  return delta_a, delta_b, new_row, new_col


def adam_direction(direction, mu, nu, count, *, b1=0.9, b2=0.999, eps=1e-8):
  """One bias-corrected Adam step on ``direction`` (Kingma and Ba, Alg. 1).

  ``count`` is the number of earlier steps. Returns ``(step, mu, nu)``.
  """
  mu = b1 * mu + (1.0 - b1) * direction
  nu = b2 * nu + (1.0 - b2) * direction**2
  mu_hat = mu / (1.0 - b1 ** (count + 1))
  nu_hat = nu / (1.0 - b2 ** (count + 1))
  return mu_hat / (np.sqrt(nu_hat) + eps), mu, nu


def adaprelora_adamw_run(
  pairs,
  head,
  weight_grads,
  head_grads,
  *,
  learning_rate,
  weight_decay=0.0,
  statistics="exact",
  clipping_threshold=1.0,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
):
  """AdaPreLoRA AdamW from the definitions, over several steps.

  Per step and pair: the AdaPreLoRA direction (:func:`adaprelora_step`), then
  Adam on each factor's direction, decoupled weight decay and the learning
  rate, ``p ← p − lr (adam + wd p)``; ``head`` (a non-LoRA leaf) gets AdamW on
  its raw gradient. ``weight_grads[t][name]`` is step t's dense ``G`` of pair
  ``name`` at the params of that step (a callable of the pairs, so the
  gradient can follow the iterate).

  Returns:
    ``(pairs, head)`` after the steps: ``{name: (a, b)}`` and the head array.
  """
  pairs = {name: (a.copy(), b.copy()) for name, (a, b) in pairs.items()}
  moments = {name: (np.zeros(a.shape[0]), np.zeros(b.shape[1])) for name, (a, b) in pairs.items()}
  adam = {
    name: [np.zeros_like(a), np.zeros_like(a), np.zeros_like(b), np.zeros_like(b)]
    for name, (a, b) in pairs.items()
  }
  head = head.copy()
  head_mu, head_nu = np.zeros_like(head), np.zeros_like(head)
  for step, (grads_fn, head_grad_fn) in enumerate(zip(weight_grads, head_grads, strict=True)):
    grads = grads_fn(pairs)
    head_grad = head_grad_fn(head)
    new_pairs = {}
    for name, (a, b) in pairs.items():
      delta_a, delta_b, row, col = adaprelora_step(
        a,
        b,
        grads[name],
        *moments[name],
        step,
        statistics=statistics,
        clipping_threshold=clipping_threshold,
      )
      moments[name] = (row, col)
      mu_a, nu_a, mu_b, nu_b = adam[name]
      step_a, mu_a, nu_a = adam_direction(delta_a, mu_a, nu_a, step, b1=b1, b2=b2, eps=eps)
      step_b, mu_b, nu_b = adam_direction(delta_b, mu_b, nu_b, step, b1=b1, b2=b2, eps=eps)
      adam[name] = [mu_a, nu_a, mu_b, nu_b]
      new_pairs[name] = (
        a - learning_rate * (step_a + weight_decay * a),
        b - learning_rate * (step_b + weight_decay * b),
      )
    head_step, head_mu, head_nu = adam_direction(
      head_grad, head_mu, head_nu, step, b1=b1, b2=b2, eps=eps
    )
    head = head - learning_rate * (head_step + weight_decay * head)
    pairs = new_pairs
  return pairs, head
