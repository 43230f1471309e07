"""Shared pytest configuration."""

import os

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per
# process when pytest-xdist runs workers in parallel.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
