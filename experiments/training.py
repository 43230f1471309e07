"""One training run: identical data order and LoRA init, checkpoint/resume.

A run is identified by (task, optimizer, learning rate, seed, preset). Its
checkpoints (orbax ``CheckpointManager``) hold the trainable state of the
model (LoRA factors and head), the optimizer state, the data position (the
step: batches are a pure function of seed and step) and the curves so far, so
``resume=True`` continues bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

import adaprelora_jax as ap
from experiments.optimizers import OptimizerSpec
from experiments.tasks.base import Budget
from experiments.tasks.base import RunConfig
from experiments.tasks.base import RunResult
from experiments.tasks.base import Task


class CheckpointError(ValueError):
  """A checkpoint cannot be used to resume this run."""


def enable_compilation_cache(directory: Path | str) -> None:
  """Keeps compiled XLA programs on disk, shared by every run and process.

  With the learning rate injected as optimizer state (see :func:`make_optimizer`)
  all runs of one (task, optimizer) pair lower to the same program, so a sweep
  compiles it once instead of once per learning rate and seed.
  """
  jax.config.update("jax_compilation_cache_dir", str(Path(directory).resolve()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def make_optimizer(
  spec: OptimizerSpec, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
  """``spec``'s transform with the learning rate (a number, or a schedule
  evaluated at each step) held in its state, not baked in."""
  return optax.inject_hyperparams(spec.factory)(learning_rate)


def _checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(directory.resolve(), options=options)


def _save(manager, step, model, optimizer, trainable, config, curves) -> None:
  state = {"model": nnx.state(model, trainable), "optimizer": nnx.state(optimizer)}
  meta = {"run": config.identity(), "step": step, "curves": curves}
  manager.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  )
  manager.wait_until_finished()


def _restore(manager, directory, model, optimizer, trainable, config):
  """Restores the latest checkpoint into model/optimizer; returns (step, curves)."""
  step = manager.latest_step()
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as error:  # orbax raises many types for damaged files
    raise CheckpointError(
      f"Could not read the checkpoint metadata at {directory}/{step} (corrupt or "
      f"incomplete?): {type(error).__name__}: {error}"
    ) from error
  if meta.get("run") != config.identity():
    raise CheckpointError(
      f"The checkpoint at {directory}/{step} was written for run {meta.get('run')} but "
      f"this run is {config.identity()}; use another checkpoint directory or remove it."
    )
  target = {"model": nnx.state(model, trainable), "optimizer": nnx.state(optimizer)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    ap.check_checkpoint_layout(Path(directory) / str(step) / "state", abstract)
    state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
  except ap.StateLayoutError as error:
    raise CheckpointError(str(error)) from error
  except Exception as error:
    raise CheckpointError(
      f"The checkpoint at {directory}/{step} does not match this run's model and "
      f"optimizer state (different code or hyperparameters?), or is corrupt: "
      f"{type(error).__name__}: {error}"
    ) from error
  nnx.update(model, state["model"])
  nnx.update(optimizer, state["optimizer"])
  return meta["step"], meta["curves"]


def train(
  task: Task,
  spec: OptimizerSpec,
  config: RunConfig,
  budget: Budget,
  *,
  checkpoint_dir: Path | str | None = None,
  resume: bool = False,
  stop_after: int | None = None,
  progress: bool = True,
) -> RunResult:
  """Trains one run; optionally resumes from and writes checkpoints.

  Args:
    task: the task.
    spec: the optimizer.
    config: run identity (``config.steps`` is the total budget).
    budget: evaluation and checkpoint cadence.
    checkpoint_dir: where this run's checkpoints live (None: no checkpoints).
    resume: continue from the latest checkpoint in ``checkpoint_dir``.
    stop_after: stop (with a checkpoint) after this many total steps, as an
      interruption would; the result is then marked incomplete.
    progress: show a tqdm progress bar.

  Returns:
    The :class:`RunResult` (final held-out metrics and curves).
  """
  if spec.statistics_shards is not None:
    raise ValueError(
      f"{config.optimizer}: per-shard statistics need qwix LoRA layers "
      f"(the flagship task), not {task.name}'s."
    )
  task.prepare(budget)
  start_time = time.perf_counter()
  model, trainable = task.build_model(config.seed, spec.exact_statistics)
  optimizer = nnx.Optimizer(
    model, make_optimizer(spec, budget.learning_rate(config.learning_rate)), wrt=trainable
  )
  checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
  manager = _checkpoint_manager(checkpoint_dir) if checkpoint_dir is not None else None
  curves: dict[str, list[float]] = {"train_loss": [], "eval_step": []}
  start = 0
  if resume:
    if manager is None or manager.latest_step() is None:
      raise CheckpointError(f"resume=True but there is no checkpoint in {checkpoint_dir}.")
    start, curves = _restore(manager, checkpoint_dir, model, optimizer, trainable, config)

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(task.loss_fn, argnums=nnx.DiffState(0, trainable))(
      model, batch
    )
    optimizer.update(model, grads)
    return loss

  end = config.steps if stop_after is None else min(stop_after, config.steps)
  bar = tqdm(
    range(start, end),
    desc=f"{config.optimizer} lr={config.learning_rate:g} seed={config.seed}",
    leave=False,
    disable=not progress,
  )
  for step in bar:
    loss = float(train_step(model, optimizer, task.train_batch(config.seed, step, budget)))
    curves["train_loss"].append(loss)
    bar.set_postfix(loss=f"{loss:.4f}")
    done = step + 1
    if done % budget.eval_every == 0 or done == config.steps:
      curves["eval_step"].append(done)
      for name, value in task.evaluate(model, budget).items():
        curves.setdefault(f"eval_{name}", []).append(value)
    if manager is not None and (
      (budget.checkpoint_every and done % budget.checkpoint_every == 0) or done == end
    ):
      _save(manager, done, model, optimizer, trainable, config, curves)
  completed = end == config.steps
  final = (
    {
      name[len("eval_") :]: values[-1]
      for name, values in curves.items()
      if name.startswith("eval_") and name != "eval_step"
    }
    if completed
    else {}
  )
  return RunResult(
    config, final, curves, time.perf_counter() - start_time, completed, model, optimizer
  )
