"""Multi-process training: 2 processes on localhost, 4 CPU devices each.

Each process runs tests/distributed_worker.py; ``jax.distributed.initialize``
joins them into one 8-device (data × model) mesh. The factors after a few
adaprelora steps must match a single-process, single-device run.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  output = tmp_path / "factors.npz"
  port = _free_port()
  env = {
    **os.environ,
    "XLA_FLAGS": " ".join(
      flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag
    )
    + " --xla_force_host_platform_device_count=4",
  }
  processes = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.distributed_worker", str(rank), "2", str(port), str(output)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for rank in range(2)
  ]
  logs = []
  for process in processes:
    try:
      logs.append(process.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      raise
  for process, log in zip(processes, logs, strict=True):
    assert process.returncode == 0, log[-3000:]
  result = np.load(output)
  assert int(result["processes"]) == 2 and int(result["devices"]) == 8

  base, target, params, inputs = worker.problem()
  tx = worker.optimizer()
  step = jax.jit(lambda p, s, x: worker.train_step(p, s, x, base, target, tx))
  state = tx.init(params)
  for x in inputs:
    params, state = step(params, state, x)
  for name in ("lora_a", "lora_b"):
    np.testing.assert_allclose(result[name], np.asarray(params[name]), rtol=1e-4, atol=1e-6)
  # The run moved the factors (b starts at zero).
  assert np.abs(result["lora_b"]).max() > 1e-4
