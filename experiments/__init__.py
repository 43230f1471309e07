"""Runnable studies of adaprelora_jax: tasks, sweeps, benchmarks and reports."""

import os


def set_xla_flag(name: str, value: str) -> None:
  """Appends ``name=value`` to ``XLA_FLAGS`` unless the flag is already set.

  XLA reads ``XLA_FLAGS`` when its backend starts, so this only takes effect
  before the first computation; a value the user already chose is kept.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if name not in flags:
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [flags, f"{name}={value}"]))


# XLA:CPU in jaxlib 0.10.2 can wedge for good on some programs: every runtime
# thread idles and the step never finishes (LoRA-RITE's update on the Milton
# character model, with three groups of vmapped QR/SVD/eigh batches, hangs on
# its first step). The trigger is the concurrency-optimized thunk scheduler;
# turning it off removes the hang and costs nothing measurable on these models
# (step times within 5 %). Importing any experiments module applies it.
set_xla_flag("--xla_cpu_enable_concurrency_optimized_scheduler", "false")
