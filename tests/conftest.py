"""Shared pytest configuration: XLA flags for every test and subprocess.

XLA reads ``XLA_FLAGS`` when its backend starts, so the flags are set here,
before any test runs a computation; subprocesses that tests start and the
executed notebooks inherit them. A value the user already chose is kept.
"""

import os

_XLA_FLAGS = {
  # XLA:CPU in jaxlib 0.10.2 can wedge for good on some programs (every
  # runtime thread idles; LoRA-RITE's step with several groups of vmapped
  # QR/SVD/eigh batches hangs): the trigger is the concurrency-optimized
  # thunk scheduler, so it is off (experiments/__init__.py does the same).
  "--xla_cpu_enable_concurrency_optimized_scheduler": "false",
  # 8 emulated host devices for the sharding tests; unsharded computations
  # still run on device 0 only.
  "--xla_force_host_platform_device_count": "8",
}

_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_flags] * bool(_flags)
  + [f"{name}={value}" for name, value in _XLA_FLAGS.items() if name not in _flags]
)

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per
# process when pytest-xdist runs workers in parallel.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax  # noqa: E402  (after the XLA flags: flax may start the backend)
import pytest  # noqa: E402

# Importing ``tunix.models`` turns off flax's ``flax_always_shard_variable``
# for the whole process (tunix/utils/env_utils.py), and collecting
# tests/test_tunix.py imports it: every nnx Variable created under a mesh
# afterwards stays unsharded. Each test starts from flax's own value instead;
# the Tunix test opts into Tunix's setting itself.
_FLAX_ALWAYS_SHARD_VARIABLE = flax.config.flax_always_shard_variable


@pytest.fixture(autouse=True)
def _flax_variable_sharding_default():
  # Nothing to undo afterwards: the next test starts here again.
  flax.config.update("flax_always_shard_variable", _FLAX_ALWAYS_SHARD_VARIABLE)
