"""Runnable studies of adaprelora_jax: tasks, sweeps, benchmarks and reports."""

import os

# XLA:CPU in jaxlib 0.10.2 can wedge for good on some programs: every runtime
# thread idles and the step never finishes (LoRA-RITE's update on the Milton
# character model, with three groups of vmapped QR/SVD/eigh batches, hangs on
# its first step). The trigger is the concurrency-optimized thunk scheduler;
# turning it off removes the hang and costs nothing measurable on these models
# (step times within 5 %). XLA reads XLA_FLAGS when the backend starts, so this
# must run before the first computation; importing any experiments module does.
_XLA_CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _XLA_CPU_SCHEDULER not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS"), f"{_XLA_CPU_SCHEDULER}=false"]))
