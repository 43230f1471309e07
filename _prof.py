import time, jax, jax.numpy as jnp, numpy as np
from experiments import tiebreak_bias as tb
c=tb.PRESETS["quick"]
opts={"xla_backend_optimization_level": 0}
with jax.enable_x64(True):
  f=jax.jit(lambda key,cond,ratio: jax.vmap(lambda pr: tb.pair_metrics(pr,c.grid))(jax.vmap(lambda k: tb.random_problem(k,cond,ratio,c.shape))(jax.random.split(key,c.pairs))), compiler_options=opts)
  t=time.perf_counter(); lo=f.lower(jax.random.key(0),1.0,1.0); print("sweep lower", time.perf_counter()-t)
  t=time.perf_counter(); co=lo.compile(); print("sweep compile", time.perf_counter()-t)
  opts2={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  f=jax.jit(lambda key,cond,ratio: jax.vmap(lambda pr: tb.pair_metrics(pr,c.grid))(jax.vmap(lambda k: tb.random_problem(k,cond,ratio,c.shape))(jax.random.split(key,c.pairs))), compiler_options=opts2)
  t=time.perf_counter(); lo=f.lower(jax.random.key(1),1.0,1.0); co=lo.compile(); print("sweep compile2", time.perf_counter()-t)
