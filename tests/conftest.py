"""Shared pytest configuration."""

import os

# Applies the XLA:CPU scheduler workaround (see experiments/__init__.py) to
# every test, the executed notebooks and the subprocesses tests start.
import experiments

# 8 emulated host devices for the sharding tests (tests/test_sharding.py); set
# before any test starts the backend. Unsharded computations still run on
# device 0 only.
experiments.set_xla_flag("--xla_force_host_platform_device_count", "8")

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per
# process when pytest-xdist runs workers in parallel.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
