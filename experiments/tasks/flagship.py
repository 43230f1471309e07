"""Flagship: a Tunix Llama 3 LoRA-adapted to Milton (and to BBC prose) through Tunix's PeftTrainer.

The base model is ``tunix.models.llama3.Llama3`` (4 layers, d=256, 2.4M
parameters) pretrained by the project on the Shakespeare plays over
characters (``experiments/pretrain_llama.py``, fixed seed, weights
committed). qwix's ``LoraProvider`` puts rank-8 adapters (alpha 8, so the
LoRA scale is 1 and every registered optimizer applies unchanged) on all
seven projections of every layer (q, k, v, o, gate, up, down); they are
trained on *Paradise Lost* and *Paradise Regained* by
``tunix.sft.peft_trainer.PeftTrainer`` with its own loss, the optimizer under
``optax.inject_hyperparams``.

Data order and held-out split are those of ``experiments.tasks.milton``
(windows of 128 characters, batch 8; the last 10 % of each work held out, a
fixed prefix of its windows evaluated), so the two Milton studies share
their data. :data:`BBC_TASK` trains the same model the same way on modern
prose (``experiments.tasks.bbc_prose``), a real domain shift. The metric is
held-out bits per character. Optimizers with exact statistics get the
adapters of :class:`adaprelora_jax.qwix.LoraProvider`, the others qwix's.

The ``tune`` preset is the decoder study's (``experiments/decoder_study.py``):
192 steps under linear warmup (1/16 of the steps) then cosine decay to 0,
for every optimizer.

Runs are stored and resumed whole by ``experiments.run`` (PeftTrainer's own
checkpoints are not used: a run is at most a few minutes). Besides the
curves of ``experiments.training`` a run records ``eval_seconds``, its
training wall-clock seconds at each evaluation with the evaluations
themselves left out, for steps- and seconds-to-target comparisons.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from experiments import assets
from experiments.optimizers import OptimizerSpec
from experiments.tasks import bbc_prose
from experiments.tasks import milton
from experiments.tasks.base import Budget
from experiments.tasks.base import RunConfig
from experiments.tasks.base import RunResult
from experiments.tasks.base import Task

RANK = ALPHA = 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The optimizers of the study: AdaPreLoRA with tangent statistics, the baselines.
OPTIMIZERS = (
  "adaprelora",
  "adaprelora_per_shard",
  "adaprelora_tangent",
  "adamw",
  "lora_plus",
  "scaled_adamw",
  "lora_pro",
  "lora_rite",
)


@functools.cache
def _tunix() -> types.SimpleNamespace:
  """Tunix's modules, imported on first use: the extra is optional and its import slow."""
  # pylint: disable=import-outside-toplevel
  from tunix.sft import hooks
  from tunix.sft import metrics_logger
  from tunix.sft import peft_trainer
  from tunix.utils import env_utils

  from experiments.models import llama

  return types.SimpleNamespace(
    llama=llama,
    peft_trainer=peft_trainer,
    hooks=hooks,
    metrics_logger=metrics_logger,
    env_utils=env_utils,
  )


def build_model(seed: int, exact_statistics: bool, **provider_options):
  """The pretrained model with fresh qwix adapters (drawn from ``seed``); under the mesh.

  With ``exact_statistics`` the adapters come from
  :class:`adaprelora_jax.qwix.LoraProvider` (the same factors, plus the
  probes that carry the exact G² statistics), with ``provider_options``
  (e.g. ``statistics_batch_axes``).
  """
  import qwix  # pylint: disable=import-outside-toplevel

  from adaprelora_jax import qwix as ap_qwix  # pylint: disable=import-outside-toplevel

  llama = _tunix().llama
  model, _, _ = llama.load(assets.llama_checkpoint())
  provider_type = ap_qwix.LoraProvider if exact_statistics else qwix.LoraProvider
  provider = provider_type(
    module_path="|".join(f".*{name}" for name in PROJECTIONS),
    rank=RANK,
    alpha=ALPHA,
    **provider_options,
  )
  dummy = np.zeros((1, SEQ_LEN + 1), np.int32)
  model = qwix.apply_lora_to_model(
    model, provider, rngs=nnx.Rngs(seed), input_tokens=dummy, cache=None, **llama.model_input(dummy)
  )
  return model, nnx.LoRAParam


def loss_fn(model: nnx.Module, windows) -> jnp.ndarray:
  return jnp.mean(_tunix().llama.next_token_nats(model, windows))


def _bits_per_char(model: nnx.Module, windows: np.ndarray) -> dict[str, float]:
  return {"bpc": _tunix().llama.bits_per_char(model, windows, batch_size=min(32, len(windows)))}


def evaluate(model: nnx.Module, budget: Budget) -> dict[str, float]:
  """Held-out Milton bits per character."""
  return _bits_per_char(model, milton.eval_windows(budget.max_eval_examples)[0])


def evaluate_bbc(model: nnx.Module, budget: Budget) -> dict[str, float]:
  """Held-out BBC bits per character."""
  return _bits_per_char(model, bbc_prose.eval_windows(budget.max_eval_examples))


def _model_input(example):
  return {
    "input_tokens": example.input_tokens,
    "input_mask": example.input_mask,
    **_tunix().llama.model_input(example.input_tokens),
  }


@functools.cache
def _clock_hooks_class() -> type:
  """PeftTrainer hooks that evaluate every ``eval_every`` steps, off the training clock.

  Evaluation runs before the step that follows a multiple of ``eval_every``
  (and, by :func:`train`, after the last step): there the model holds
  exactly that many updates, whereas Tunix reports a step's end one step
  late, after the next step has been applied.
  """
  hooks = _tunix().hooks

  class ClockHooks(hooks.TrainingHooks):
    """Appends ``eval_step``, ``eval_seconds`` and ``eval_<metric>`` to ``curves``,
    and calls ``probe(done)`` (if given) before every step."""

    def __init__(self, evaluate, eval_every: int, steps: int, curves: dict, bar, probe=None):
      self._evaluate, self._eval_every, self._steps = evaluate, eval_every, steps
      self._curves, self._bar, self._probe = curves, bar, probe
      self._training_seconds, self._resumed_at = 0.0, time.perf_counter()

    def evaluate(self, done: int) -> None:
      self._training_seconds += time.perf_counter() - self._resumed_at
      self._curves["eval_step"].append(done)
      self._curves["eval_seconds"].append(self._training_seconds)
      for name, value in self._evaluate().items():
        self._curves.setdefault(f"eval_{name}", []).append(value)
      self._resumed_at = time.perf_counter()

    def on_train_start(self, train_ctx):
      self._resumed_at = time.perf_counter()

    def on_train_step_start(self, train_ctx):
      done = train_ctx.train_steps
      self._bar.update(done - self._bar.n)
      if self._probe is not None:
        self._probe(done)
      if done and done % self._eval_every == 0 and done < self._steps:
        self.evaluate(done)

    # The rest of the interface: nothing to do.
    def on_train_end(self, train_ctx):
      pass

    def on_train_step_end(self, train_ctx, train_step, train_loss):
      pass

    def on_eval_step_start(self, train_ctx):
      pass

    def on_eval_step_end(self, train_ctx, eval_loss):
      pass

  return ClockHooks


def _optimizer(spec: OptimizerSpec, learning_rate: optax.ScalarOrSchedule):
  """``spec``'s transform, the learning rate (a number or a schedule) injected
  under the name Tunix logs it by.

  (:func:`experiments.training.make_optimizer` keeps the factory's own name.)
  """
  return optax.inject_hyperparams(lambda learning_rate: spec.factory(learning_rate))(learning_rate)


def _batches(task: Task, seed: int, steps: int, budget: Budget):
  training_input = _tunix().peft_trainer.TrainingInput
  for step in range(steps):
    windows = np.asarray(task.train_batch(seed, step, budget))
    yield training_input(input_tokens=windows, input_mask=np.ones_like(windows, bool))


def train(
  task: Task,
  spec: OptimizerSpec,
  config: RunConfig,
  budget: Budget,
  *,
  checkpoint_dir: Path | str | None = None,
  resume: bool = False,
  progress: bool = True,
  step_probe: Callable[[int, nnx.Module, nnx.Optimizer], None] | None = None,
) -> RunResult:
  """One run through ``PeftTrainer``; the ``Task.trainer`` contract of ``experiments.run``.

  ``checkpoint_dir`` holds Tunix's metrics logs only (None: a scratch
  directory); ``resume`` is ignored (runs are stored whole). ``step_probe``
  is called as ``step_probe(done, model, optimizer)`` when the model holds
  ``done`` updates, for ``done`` from 0 to ``config.steps`` (outside the
  training clock's evaluations but inside its time: for diagnostics, not
  timed runs).
  """
  del resume
  tunix = _tunix()
  llama, peft_trainer = tunix.llama, tunix.peft_trainer
  # What importing tunix.models does, once per process; done per run because
  # the test suite restores flax's default before each test.
  tunix.env_utils.setup_sharding_environment()
  task.prepare(budget)
  start = time.perf_counter()
  curves = {"train_loss": [], "eval_step": [], "eval_seconds": []}
  # Tunix's metrics logger always writes TensorBoard files: into the run's
  # directory, or a scratch one (never the working directory).
  with tempfile.TemporaryDirectory() as scratch, jax.set_mesh(llama.mesh()):
    logs = str(Path(checkpoint_dir or scratch) / "logs")
    options = {}
    if spec.statistics_shards is not None:
      options["statistics_batch_axes"] = spec.statistics_shards
    model, _ = task.build_model(config.seed, spec.exact_statistics, **options)
    training_config = peft_trainer.TrainingConfig(
      eval_every_n_steps=config.steps + 1,
      max_steps=config.steps,
      metrics_logging_options=tunix.metrics_logger.MetricsLoggerOptions(log_dir=logs),
      pbar_description=None,
    )
    trainer = peft_trainer.PeftTrainer(
      model, _optimizer(spec, budget.learning_rate(config.learning_rate)), training_config
    ).with_gen_model_input_fn(_model_input)
    with tqdm(
      total=config.steps,
      desc=f"{config.optimizer} lr={config.learning_rate:g} seed={config.seed}",
      leave=False,
      disable=not progress,
    ) as bar:
      probe = None
      if step_probe is not None:

        def probe(done: int) -> None:
          step_probe(done, model, trainer.optimizer)

      hooks = _clock_hooks_class()(
        lambda: task.evaluate(model, budget), budget.eval_every, config.steps, curves, bar, probe
      )
      trainer.with_training_hooks(hooks)
      trainer.train(_batches(task, config.seed, config.steps, budget))
      if probe is not None:
        probe(config.steps)
      hooks.evaluate(config.steps)
    curves["train_loss"] = [
      float(loss) for loss in trainer.metrics_logger.get_metric_history("", "loss", "train")
    ]
  final = {
    name[len("eval_") :]: values[-1]
    for name, values in curves.items()
    if name.startswith("eval_") and name not in ("eval_step", "eval_seconds")
  }
  return RunResult(
    config, final, curves, time.perf_counter() - start, True, model, trainer.optimizer
  )


SEQ_LEN = milton.SEQ_LEN
TOKENS_PER_STEP = milton.BATCH * milton.SEQ_LEN
# Caps: examples = characters of training text, eval = windows.
SMOKE = Budget(steps=4, eval_every=2, seeds=1, max_train_examples=20_000, max_eval_examples=16)
# The decoder study's budget: at least 192 steps (the curves still fall there
# at constant learning rate), each optimizer's learning rate selected at this
# budget and schedule.
TUNE = Budget(
  steps=192,
  eval_every=24,
  seeds=3,
  max_eval_examples=128,
  schedule="warmup_cosine",
  warmup_fraction=1 / 16,
)

TASK = Task(
  name="flagship",
  model=(
    f"tunix.models.llama3.Llama3, 4 layers, d=256, 4 query / 2 kv heads, SwiGLU 512 "
    f"(2.4M params), pretrained by the project on Shakespeare over characters; qwix "
    f"LoRA r={RANK} alpha={ALPHA} on {','.join(PROJECTIONS)} of all layers, trained "
    f"by tunix PeftTrainer; windows of {milton.SEQ_LEN}, batch {milton.BATCH}"
  ),
  dataset=milton.TASK.dataset,
  metric="bpc",
  higher_is_better=False,
  presets={
    "smoke": SMOKE,
    # The pilot and half-decade sweep of experiments.run: 102 runs, about an
    # hour on 2 shared cores; the long leg (each optimizer's best lr, 4x the
    # budget, 18 runs) about 40 minutes. Constant learning rate.
    "full": Budget(steps=48, eval_every=24, seeds=3, max_eval_examples=128),
    "long": Budget(steps=192, eval_every=24, seeds=3, max_eval_examples=128),
    "tune": TUNE,
  },
  build_model=build_model,
  train_batch=milton.train_batch,
  loss_fn=loss_fn,
  evaluate=evaluate,
  prepare=milton.prepare,
  trainer=train,
)

# The same model, adapters and trainer on another corpus.
BBC_TASK = dataclasses.replace(
  TASK,
  name="flagship_bbc",
  dataset=bbc_prose.DATASET,
  presets={"smoke": SMOKE, "tune": TUNE},
  train_batch=bbc_prose.train_batch,
  evaluate=evaluate_bbc,
  prepare=bbc_prose.prepare,
)
