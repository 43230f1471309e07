"""Checkpoint/resume of experiment runs: bit for bit, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adaprelora_jax as ap
from adaprelora_jax._src.engine import state_layout
from experiments import optimizers
from experiments.tasks import TASKS
from experiments.tasks.base import RunConfig
from experiments.training import CheckpointError
from experiments.training import train

ROOT = Path(__file__).resolve().parents[2]
TASK = TASKS["digits"]
BUDGET = TASK.presets["smoke"]
CONFIG = RunConfig("digits", "adaprelora_momentum", 0.01, 0, "smoke", 24)

# Runs in a fresh interpreter: train (part of) the run, dump the final trainable
# state, optimizer state and loss curve.
_CHILD = """
import json, sys
import numpy as np, jax
from flax import nnx
import adaprelora_jax as ap
from adaprelora_jax._src.engine import state_layout
from experiments import optimizers
from experiments.tasks import TASKS
from experiments.tasks.base import RunConfig
from experiments.training import train
config = RunConfig(**json.loads(sys.argv[1]))
task = TASKS[config.task]
result = train(task, optimizers.OPTIMIZERS[config.optimizer], config, task.presets["smoke"],
               checkpoint_dir=sys.argv[2], resume=sys.argv[3] == "resume",
               stop_after=int(sys.argv[4]) or None, progress=False)
trainable = nnx.state(result.model, task.build_model(0, True)[1])
leaves = jax.tree.leaves(trainable) + jax.tree.leaves(nnx.state(result.optimizer))
np.savez(sys.argv[5], loss=np.asarray(result.curves["train_loss"]),
         **{f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
"""


def _child(tmp_path, name, checkpoint_dir, mode, stop_after):
  output = tmp_path / f"{name}.npz"
  subprocess.run(
    [
      sys.executable,
      "-c",
      _CHILD,
      json.dumps(CONFIG.identity()),
      str(checkpoint_dir),
      mode,
      str(stop_after),
      str(output),
    ],
    cwd=ROOT,
    check=True,
    timeout=600,
  )
  return dict(np.load(output))


def test_resume_in_a_fresh_process_is_bit_for_bit(tmp_path):
  uninterrupted = _child(tmp_path, "full", tmp_path / "ckpt_full", "fresh", 0)
  _child(tmp_path, "first", tmp_path / "ckpt", "fresh", 10)  # N = 10 steps, then stop
  resumed = _child(tmp_path, "second", tmp_path / "ckpt", "resume", 0)  # M = 14 more
  assert len(resumed["loss"]) == 24
  assert set(resumed) == set(uninterrupted)
  for key in uninterrupted:
    np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


def _run(directory, config=CONFIG, spec="adaprelora_momentum", **kwargs):
  return train(
    TASK,
    optimizers.OPTIMIZERS[spec],
    config,
    BUDGET,
    checkpoint_dir=directory,
    progress=False,
    **kwargs,
  )


def _partial_run(directory):
  return _run(directory, stop_after=10)


def _resume(directory, config=CONFIG, spec="adaprelora_momentum"):
  return _run(directory, config, spec, resume=True)


def test_checkpoint_of_another_run_is_rejected(tmp_path):
  _partial_run(tmp_path / "ckpt")
  other = RunConfig("digits", "adaprelora_momentum", 0.03, 0, "smoke", 24)
  with pytest.raises(CheckpointError, match=r"was written for run .*'learning_rate': 0.01"):
    _resume(tmp_path / "ckpt", other, "adaprelora_momentum")


def test_checkpoint_with_another_state_structure_is_rejected(tmp_path):
  _partial_run(tmp_path / "ckpt")
  # Same run identity, but an optimizer whose state has no momentum.
  with pytest.raises(CheckpointError, match="does not match this run's model and optimizer"):
    _resume(tmp_path / "ckpt", CONFIG, "adaprelora")


def test_checkpoint_of_another_state_layout_names_both_layouts(tmp_path, monkeypatch):
  _partial_run(tmp_path / "ckpt")
  saved = ap.STATE_LAYOUT_VERSION
  # A release with the next layout resumes this run.
  monkeypatch.setattr(state_layout, "STATE_LAYOUT_VERSION", saved + 1)
  with pytest.raises(
    CheckpointError,
    match=rf"holds optimizer state layout {saved} .*"
    rf"reads state layout {saved + 1}",
  ):
    _resume(tmp_path / "ckpt", CONFIG, "adaprelora_momentum")


def test_corrupt_checkpoint_is_rejected(tmp_path):
  _partial_run(tmp_path / "ckpt")
  damaged = 0
  for path in (tmp_path / "ckpt").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "meta" not in str(path):
      path.write_bytes(b"\0" * 7)
      damaged += 1
  assert damaged
  with pytest.raises(CheckpointError, match="corrupt"):
    _resume(tmp_path / "ckpt", CONFIG, "adaprelora_momentum")


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint"):
    _resume(tmp_path / "empty", CONFIG, "adaprelora")
