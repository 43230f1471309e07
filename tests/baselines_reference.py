"""Independent numpy float64 transcriptions of the baseline LoRA optimizers.

Each function follows the published update rule in the paper's own notation
and layout: PyTorch/peft ``W = W0 + s·B A`` with ``A: (r, n)``, ``B: (m, r)``
and ``G = ∂L/∂W`` of shape (m, n) for LoRA+, the Riemannian preconditioner
and LoRA-Pro; ``Z = A Bᵀ`` with ``A: (m, r)``, ``B: (n, r)`` for LoRA-RITE.
The tests map the package's flax layout onto it. Where a paper states a
characterization rather than a formula (LoRA-Pro's Theorems 2.1/2.2) the
reference solves the characterization directly (dense least squares over the
factor space and its null space) instead of transcribing the closed form.
Nothing here imports the package.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Adam:
  """Bias-corrected Adam moments of one array (Kingma and Ba, Algorithm 1)."""

  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  m: np.ndarray | float = 0.0
  v: np.ndarray | float = 0.0
  t: int = 0

  def direction(self, grad: np.ndarray) -> np.ndarray:
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * grad
    self.v = self.b2 * self.v + (1 - self.b2) * grad**2
    m_hat = self.m / (1 - self.b1**self.t)
    v_hat = self.v / (1 - self.b2**self.t)
    return m_hat / (np.sqrt(v_hat) + self.eps)


def lora_gradients(A, B, G, scale=1.0):
  """``(∂L/∂A, ∂L/∂B) = (s BᵀG, s G Aᵀ)`` for ``W = W0 + s B A``."""
  return scale * B.T @ G, scale * G @ A.T


# ----------------------------------------------------------------- LoRA+ ----


def lora_plus_step(A, B, G, adam_a: Adam, adam_b: Adam, *, lr, ratio, weight_decay):
  """AdamW with learning rate ``lr`` for A and ``ratio·lr`` for B.

  PyTorch AdamW's decoupled decay, ``P ← P (1 − lr_P λ) − lr_P Adam(g_P)``.
  """
  g_a, g_b = lora_gradients(A, B, G)
  lr_b = ratio * lr
  new_a = A * (1 - lr * weight_decay) - lr * adam_a.direction(g_a)
  new_b = B * (1 - lr_b * weight_decay) - lr_b * adam_b.direction(g_b)
  return new_a, new_b


# ------------------------------------------- Riemannian preconditioned ----


def riemannian_preconditioned(A, B, G, reg):
  """Zhang & Pilanci: ``(BᵀB + δI)⁻¹ ∇_A`` and ``∇_B (AAᵀ + δI)⁻¹``."""
  g_a, g_b = lora_gradients(A, B, G)
  eye = np.eye(A.shape[0])
  return (np.linalg.inv(B.T @ B + reg * eye) @ g_a, g_b @ np.linalg.inv(A @ A.T + reg * eye))


def scaled_gd_step(A, B, G, *, lr, reg):
  precond_a, precond_b = riemannian_preconditioned(A, B, G, reg)
  return A - lr * precond_a, B - lr * precond_b


def scaled_adamw_step(A, B, G, adam_a: Adam, adam_b: Adam, *, lr, reg, weight_decay):
  """Both preconditioners from the factors *before* the step (the paper)."""
  precond_a, precond_b = riemannian_preconditioned(A, B, G, reg)
  new_a = A - lr * (adam_a.direction(precond_a) + weight_decay * A)
  new_b = B - lr * (adam_b.direction(precond_b) + weight_decay * B)
  return new_a, new_b


# -------------------------------------------------------------- LoRA-Pro ----


def _equivalent_gradient_map(A, B, scale):
  """Dense matrix of ``(δA, δB) ↦ s (B δA + δB A)``, columns vec(δA) then vec(δB)."""
  rank, n = A.shape
  m = B.shape[0]
  columns = []
  for k in range(rank * n):
    unit = np.zeros(rank * n)
    unit[k] = 1.0
    columns.append((scale * B @ unit.reshape(rank, n)).ravel())
  for k in range(m * rank):
    unit = np.zeros(m * rank)
    unit[k] = 1.0
    columns.append((scale * unit.reshape(m, rank) @ A).ravel())
  return np.stack(columns, axis=1)


def tangent_projection(A, B, D):
  """Frobenius projection of D onto ``{B X + Y A}`` (= LoRA-Pro's ``g̃``)."""
  jacobian = _equivalent_gradient_map(A, B, 1.0)
  solution, *_ = np.linalg.lstsq(jacobian, D.ravel(), rcond=None)
  return (jacobian @ solution).reshape(D.shape)


def lora_pro_projection(A, B, D, scale):
  """LoRA-Pro's factor steps for a W-space direction D, from Theorems 2.1/2.2.

  Theorem 2.1: the steps minimize ``‖s (B δA + δB A) − D‖``. Theorem 2.2:
  among those, the pair closest to the factor gradients of D,
  ``(u_A, u_B) = (s BᵀD, s D Aᵀ)``. Solved as stated: a minimum-norm least
  squares solution, then the nearest point of the solution set (the
  particular solution plus the null space of the map) to ``(u_A, u_B)``.
  """
  jacobian = _equivalent_gradient_map(A, B, scale)
  particular, *_ = np.linalg.lstsq(jacobian, D.ravel(), rcond=None)
  _, singular, vt = np.linalg.svd(jacobian)
  tol = max(jacobian.shape) * np.finfo(float).eps * singular[0]
  null_space = vt[np.sum(singular > tol) :].T
  u_a, u_b = lora_gradients(A, B, D, scale)
  target = np.concatenate([u_a.ravel(), u_b.ravel()])
  solution = particular + null_space @ (null_space.T @ (target - particular))
  split = A.size
  return solution[:split].reshape(A.shape), solution[split:].reshape(B.shape)


def lora_pro_efficient_step(A, B, G, adam_a: Adam, adam_b: Adam, *, lr, scale):
  delta_a, delta_b = lora_pro_projection(A, B, G, scale)
  return A - lr * adam_a.direction(delta_a), B - lr * adam_b.direction(delta_b)


def lora_pro_full_step(A, B, G, adam_w: Adam, *, lr, scale):
  """Adam in W space on the equivalent gradient, projected back."""
  direction = adam_w.direction(tangent_projection(A, B, G))
  delta_a, delta_b = lora_pro_projection(A, B, direction, scale)
  return A - lr * delta_a, B - lr * delta_b


# ------------------------------------------------------------- LoRA-RITE ----


def bias_corrected_decay(decay, t):
  """Adafactor §7.1: ``β (1 − β^(t−1)) / (1 − β^t)`` (t 1-based)."""
  return decay * (1 - decay ** (t - 1)) / (1 - decay**t)


@dataclasses.dataclass
class RiteFactorState:
  """LoRA-RITE state of one factor (paper layout)."""

  rows: int
  rank: int
  first: np.ndarray = None
  second: np.ndarray = None
  other_basis: np.ndarray = None  # previous U of the *other* factor
  escape: float = 0.0

  def __post_init__(self):
    self.first = np.zeros((self.rows, self.rank))
    self.second = np.zeros((self.rank, self.rank))
    self.other_basis = np.zeros((0, self.rank))


def _rms(x):
  return np.sqrt(np.mean(x**2))


def lora_rite_steps(pairs, states, t, *, lr, b1, b2, eps, clip, skip, cap, escape):
  """One LoRA-RITE step (Algorithm 1, Adam form) of every pair.

  Args:
    pairs: list of ``(A, B, G)`` with ``Z = A Bᵀ``, ``G = ∂L/∂Z``.
    states: list of ``(RiteFactorState for A, RiteFactorState for B)``.
    t: 1-based step.
    lr, b1, b2, eps: learning rate, decays, epsilon.
    clip, skip, cap: global clipping norm, skipping and capping RMS
      thresholds, or None.
    escape: whether to track the escaped mass.

  Returns:
    The new ``[(A, B)]``; ``states`` are updated in place.
  """
  # Unmagnified gradients ∇_A R_B⁻¹ = G U_B, computed from G directly.
  prepared = []
  for A, B, G in pairs:
    basis_a, rotation_a = np.linalg.qr(A)
    basis_b, rotation_b = np.linalg.qr(B)
    grads = [G @ basis_b, G.T @ basis_a]
    if skip is not None:
      grads = [np.zeros_like(g) if _rms(g) > skip else g for g in grads]
    prepared.append((grads, (basis_a, basis_b), (rotation_a, rotation_b)))
  norm = np.sqrt(sum(np.sum(g**2) for grads, _, _ in prepared for g in grads))
  clip_scale = clip / norm if clip is not None and norm > clip else 1.0
  beta1, beta2 = bias_corrected_decay(b1, t), bias_corrected_decay(b2, t)

  new_pairs = []
  for (A, B, _), (grads, bases, rotations), factor_states in zip(
    pairs, prepared, states, strict=True
  ):
    new_factors = []
    for side, (param, grad, state) in enumerate(zip((A, B), grads, factor_states, strict=True)):
      other_basis, other_rotation = bases[1 - side], rotations[1 - side]
      grad = clip_scale * grad
      if state.other_basis.shape[0]:
        transport = other_basis.T @ state.other_basis
      else:
        transport = np.zeros((param.shape[1],) * 2)
      transported = transport @ state.second @ transport.T
      if escape:
        lost = min(
          np.max(np.linalg.eigvalsh(state.second) - np.linalg.eigvalsh(transported)),
          np.trace(state.second) - np.trace(transported),
        )
        state.escape = beta2 * (state.escape + max(lost, 0.0))
      state.second = beta2 * transported + (1 - beta2) * grad.T @ grad / grad.shape[0]
      w, v = np.linalg.eigh(state.second)
      inverse_root = v @ np.diag(1 / (np.sqrt(np.maximum(w, 0) + state.escape) + eps)) @ v.T
      state.first = beta1 * state.first @ transport.T + (1 - beta1) * grad @ inverse_root
      step = state.first
      if cap is not None:
        step = step / max(1.0, _rms(step) / cap)
      state.other_basis = other_basis
      # M R⁻ᵀ of the other factor.
      new_factors.append(param - lr * np.linalg.solve(other_rotation, step.T).T)
    new_pairs.append(tuple(new_factors))
  return new_pairs
