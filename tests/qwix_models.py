"""A small Gemma-like nnx model made LoRA by qwix, for tests/test_qwix.py.

Attention einsums in Gemma's layouts (q ``'BTD,NDH->BTNH'``, kv
``'BTD,CNDH->CBTNH'``, ``'BTNH,NHD->BTD'``), one MoE einsum
``'EBD,EDF->EBF'`` and two ``nnx.Linear`` layers; base weights carry Tunix-
style sharding names on a ``('fsdp', 'tp')`` mesh, which qwix copies to the
LoRA factors with the rank axis unsharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from qwix._src import interception

from adaprelora_jax import qwix as ap_qwix

D, N, H, C, E, F = 16, 4, 8, 2, 2, 32
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
AXES = ("fsdp", "tp")


class DenseDelta(nnx.Variable):
  """A zero ``ΔW`` added to a weight: its gradient is the weight's ``G``.

  Not an ``nnx.Param``, so neither qwix nor the optimizer takes it for a
  weight; the product with it runs with qwix's interception off (qwix would
  otherwise match it to the same-shaped weight and add LoRA a second time).
  """


def _uninterrupted(op, *args):
  return interception.disable_interceptions(op)(*args)


class Einsum(nnx.Module):
  """A weight used through ``jnp.einsum`` (as Tunix's ``Einsum`` modules)."""

  def __init__(self, spec: str, shape, sharding, rngs: nnx.Rngs, dense_delta: bool = False):
    self.spec = spec
    self.w = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), shape), out_sharding=sharding)
    self.dw = DenseDelta(jnp.zeros(shape)) if dense_delta else None

  def __call__(self, x):
    y = jnp.einsum(self.spec, x, self.w[...])
    if self.dw is not None:
      y = y + _uninterrupted(jnp.einsum, self.spec, x, self.dw[...])
    return y


class Linear(nnx.Linear):
  """``nnx.Linear``, optionally with a zero :class:`DenseDelta` on its kernel."""

  def __init__(self, d_in: int, d_out: int, sharding, rngs: nnx.Rngs, dense_delta: bool = False):
    super().__init__(d_in, d_out, rngs=rngs, kernel_metadata={"out_sharding": sharding})
    self.dw = DenseDelta(jnp.zeros((d_in, d_out))) if dense_delta else None

  def __call__(self, x):
    y = super().__call__(x)
    if self.dw is not None:
      y = y + _uninterrupted(jnp.matmul, x, self.dw[...])
    return y


class GemmaLike(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dense_delta: bool = False):
    def einsum(spec, shape, sharding):
      return Einsum(spec, shape, sharding, rngs, dense_delta)

    self.q_einsum = einsum("BTD,NDH->BTNH", (N, D, H), ("tp", "fsdp", None))
    self.kv_einsum = einsum("BTD,CNDH->CBTNH", (C, N, D, H), (None, "tp", "fsdp", None))
    self.attn_vec_einsum = einsum("BTNH,NHD->BTD", (N, H, D), ("tp", None, "fsdp"))
    self.moe = einsum("EBD,EDF->EBF", (E, D, F), (None, "fsdp", "tp"))
    self.up = Linear(D, F, ("fsdp", "tp"), rngs, dense_delta)
    self.down = Linear(F, D, ("tp", "fsdp"), rngs, dense_delta)

  def __call__(self, x):
    q = self.q_einsum(x)
    k, v = self.kv_einsum(x)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H)
    attended = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v)
    h = x + self.attn_vec_einsum(attended)
    batch, time, _ = h.shape
    flat = h.reshape(batch * time, D)
    experts = self.moe(jnp.broadcast_to(flat[None], (E, batch * time, D)))
    hidden = jax.nn.gelu(jnp.mean(experts, 0) + self.up(flat))
    return h + self.down(hidden).reshape(batch, time, D)


# pair name -> (the base weight's axes that form lora_a's d_in, those that form
# lora_b's d_out), in the weight's axis order as qwix lays the factors out.
WEIGHT_AXES = {
  "q_einsum/w": ((1,), (0, 2)),
  "kv_einsum/w": ((2,), (0, 1, 3)),
  "attn_vec_einsum/w": ((0, 1), (2,)),
  "moe/w": ((0, 1), (2,)),
  "up/kernel": ((0,), (1,)),
  "down/kernel": ((0,), (1,)),
}


def mesh(devices: int = 8) -> jax.sharding.Mesh:
  """A ``('fsdp', 'tp')`` mesh: (2, 4) on 8 devices, (1, 1) on one."""
  shape = (2, 4) if devices == 8 else (1, 1)
  return jax.make_mesh(
    shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:devices]
  )


def lora_model(
  seed: int = 0,
  *,
  random_b: bool = True,
  exact_statistics: bool = False,
  dense_delta: bool = False,
  **lora_options,
) -> GemmaLike:
  """The model with qwix LoRA on every weight (call under ``jax.set_mesh``).

  Args:
    seed: initialization seed.
    random_b: give ``lora_b`` random values (qwix initializes it to zero), so
      that both factors have full rank and the step is not degenerate.
    exact_statistics: use :class:`adaprelora_jax.qwix.LoraProvider` (probe
      leaves with the exact statistics) instead of ``qwix.LoraProvider``.
    dense_delta: add a zero :class:`DenseDelta` to every adapted weight.
    **lora_options: more arguments of the provider (``dropout``,
      ``weight_qtype``, ...).
  """
  model = GemmaLike(nnx.Rngs(seed), dense_delta=dense_delta)
  provider_type = ap_qwix.LoraProvider if exact_statistics else qwix.LoraProvider
  provider = provider_type(module_path=".*", rank=RANK, alpha=ALPHA, **lora_options)
  model = qwix.apply_lora_to_model(model, provider, jnp.ones((1, 2, D)), rngs=nnx.Rngs(seed + 1))
  if lora_options.get("dropout"):
    # qwix draws LoRA dropout masks from ``qwix_rngs`` at call time.
    model.set_attributes(qwix_rngs=nnx.Rngs(dropout=seed + 3), raise_if_not_found=False)
  if random_b:
    keys = iter(jax.random.split(jax.random.key(seed + 2), 16))
    for path, variable in nnx.iter_graph(model):
      if isinstance(variable, nnx.LoRAParam) and str(path[-1]).endswith("_lora_b"):
        value = variable.get_value()
        noise = 0.3 * jax.random.normal(next(keys), value.shape, value.dtype)
        variable.set_value(jax.device_put(noise, value.sharding))
  return model


def batch(seed: int = 0, size: int = 4, time: int = 3):
  keys = jax.random.split(jax.random.key(100 + seed), 2)
  x = jax.random.normal(keys[0], (size, time, D))
  return x, jnp.sin(2.0 * x) + 0.1 * jax.random.normal(keys[1], x.shape)


def loss_fn(model: GemmaLike, x, y):
  return jnp.mean((model(x) - y) ** 2)
