"""Where the studies keep their files, and the environment each result records.

* :data:`RESULTS`: the committed results (``experiments/results``);
* :data:`CACHE`: one file per completed run of a sweep (not committed);
* :data:`CHECKPOINTS`: the checkpoints of runs in progress (not committed);
* :data:`COMPILATION_CACHE`: JAX's persistent compilation cache;
* :func:`environment`: the versions, machine, commit and date stored with
  every results file.

Shared by the scripts (``run``, ``flagship``, ``demo`` and the benchmarks),
so that none of them imports another script for its paths.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import jax
import optax

import adaprelora_jax

ROOT = Path(__file__).parent
CACHE = ROOT / ".cache" / "runs"
RESULTS = ROOT / "results"
CHECKPOINTS = ROOT / "checkpoints"
COMPILATION_CACHE = ROOT / ".cache" / "jax"


def environment() -> dict:
  """Library versions, backend, machine, commit and date of the current process."""
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
  except OSError:
    commit = ""
  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "adaprelora_jax": adaprelora_jax.__version__,
    "backend": jax.default_backend(),
    "device_count": jax.device_count(),
    "machine": platform.machine(),
    "python": platform.python_version(),
    "commit": commit,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
