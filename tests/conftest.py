"""Shared pytest configuration."""

import os

# 8 emulated host devices for the sharding tests (tests/test_sharding.py); XLA
# reads the flag when its backend starts, before any test runs. Unsharded
# computations still run on device 0 only.
_DEVICES = "--xla_force_host_platform_device_count"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}=8".strip()

# Applies the XLA:CPU scheduler workaround (see experiments/__init__.py) to
# every test, the executed notebooks and the subprocesses tests start.
import experiments  # noqa: F401

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per
# process when pytest-xdist runs workers in parallel.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
