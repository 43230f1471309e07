"""One process of the multi-process test (tests/test_distributed.py).

Run as ``python -m tests.distributed_worker <process_id> <num_processes>
<port> <output.npz>`` with ``--xla_force_host_platform_device_count`` set:
joins the localhost cluster with ``jax.distributed.initialize``, trains
:func:`train` on a global (data × model) mesh spanning every process's CPU
devices, and (process 0) writes the final LoRA factors.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaprelora_jax as ap
from adaprelora_jax import sharding

D_IN, RANK, D_OUT, BATCH, STEPS = 64, 4, 48, 32, 4


def problem():
  """A frozen base weight, LoRA factors (b = 0) and a regression batch per step."""
  keys = jax.random.split(jax.random.key(0), 4)
  base = jax.random.normal(keys[0], (D_IN, D_OUT)) / np.sqrt(D_IN)
  target = base + 0.1 * jax.random.normal(keys[1], (D_IN, D_OUT))
  params = {
    "lora_a": jax.random.normal(keys[2], (D_IN, RANK)) / np.sqrt(D_IN),
    "lora_b": jnp.zeros((RANK, D_OUT)),
  }
  inputs = [
    jax.random.normal(jax.random.fold_in(keys[3], step), (BATCH, D_IN)) for step in range(STEPS)
  ]
  return base, target, params, inputs


def optimizer() -> optax.GradientTransformation:
  return ap.adaprelora(1e-2, b1=0.9)


def loss_fn(params, base, target, x):
  prediction = x @ base + (x @ params["lora_a"]) @ params["lora_b"]
  return jnp.mean((prediction - x @ target) ** 2)


def train_step(params, state, x, base, target, tx):
  """One adaprelora step on the regression loss."""
  grads = jax.grad(loss_fn)(params, base, target, x)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def main(process_id: int, num_processes: int, port: int, output: str) -> None:
  jax.distributed.initialize(
    f"localhost:{port}", num_processes=num_processes, process_id=process_id
  )
  mesh = jax.make_mesh(
    (2, jax.device_count() // 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  base, target, params, inputs = problem()
  replicated = NamedSharding(mesh, P())
  param_shardings = {
    "lora_a": NamedSharding(mesh, P("data", None)),
    "lora_b": NamedSharding(mesh, P(None, "model")),
  }
  tx = optimizer()
  state_shardings = sharding.state_shardings(tx, params, param_shardings)

  def to_global(value, target_sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, target_sharding, lambda index: value[index])

  params = jax.tree.map(to_global, params, param_shardings)
  base, target = to_global(base, replicated), to_global(target, replicated)
  batch_sharding = NamedSharding(mesh, P("data", None))
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  step = jax.jit(
    lambda p, s, x: train_step(p, s, x, base, target, tx),
    in_shardings=(param_shardings, state_shardings, batch_sharding),
    out_shardings=(param_shardings, state_shardings),
  )
  for x in inputs:
    params, state = step(params, state, to_global(x, batch_sharding))
  gathered = multihost_utils.process_allgather(params, tiled=True)
  if process_id == 0:
    np.savez(
      output,
      devices=jax.device_count(),
      processes=jax.process_count(),
      **{name: np.asarray(value) for name, value in gathered.items()},
    )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
