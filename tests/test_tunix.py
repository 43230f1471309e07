"""Tunix end to end: a Qwen3 model (random weights, tiny config) made LoRA by
qwix (tangent statistics) or by ``adaprelora_jax.qwix.LoraProvider`` (exact
statistics) and trained by ``tunix.sft.PeftTrainer`` with both AdaPreLoRA variants under
``optax.inject_hyperparams``, with gradient accumulation (Tunix wraps the
optimizer in ``optax.MultiSteps``) and Orbax checkpoints.

Needs the ``integrations`` extra (google-tunix).
"""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import adaprelora_jax as ap

pytest.importorskip("qwix")
pytest.importorskip("tunix")
import qwix  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402
from tunix.sft import metrics_logger  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402
from tunix.sft import utils as sft_utils  # noqa: E402
from tunix.utils import env_utils  # noqa: E402

from adaprelora_jax import qwix as ap_qwix  # noqa: E402
from adaprelora_jax import tunix_hooks  # noqa: E402

# Three PeftTrainers compile their steps: minutes on a loaded 2-core CPU. CI
# runs it as its own step (pytest -m slow tests/test_tunix.py).
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]

RANK, ALPHA = 4, 8.0
ACCUMULATION = 2
VOCAB, SEQ, BATCH = 64, 8, 4


@pytest.fixture(autouse=True)
def _tunix_sharding_environment():
  # What importing tunix.models does (tests/conftest.py resets flax's default
  # before each test): the Tunix models shard their variables themselves.
  env_utils.setup_sharding_environment()


def _mesh():
  # Tunix's default sharding names: ("fsdp", "tp"); one CPU device each.
  return jax.make_mesh(
    (1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:1]
  )


def _qwen3_config():
  return qwen3.ModelConfig(
    num_layers=1,
    vocab_size=VOCAB,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    head_dim=8,
    num_kv_heads=2,
    rope_theta=10_000,
    norm_eps=1e-6,
  )


def _lora_model(exact_statistics):
  model = qwen3.Qwen3(_qwen3_config(), rngs=nnx.Rngs(0))
  # adaprelora_jax.qwix.LoraProvider: the same adapters, plus the probes that
  # carry the exact statistics of G.
  provider_type = ap_qwix.LoraProvider if exact_statistics else qwix.LoraProvider
  provider = provider_type(
    module_path=".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj",
    rank=RANK,
    alpha=ALPHA,
  )
  return qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(1), **model.get_model_input())


def _batches(count):
  """A learnable sequence task: each token is the previous one plus one."""
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(count):
    start = rng.integers(1, VOCAB - SEQ, size=(BATCH, 1))
    tokens = (start + np.arange(SEQ)).astype(np.int32)
    batches.append(
      peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool))
    )
  return batches


def _model_input(x):
  # As tunix/cli/peft_main.py builds it.
  pad_mask = x.input_tokens != 0
  return {
    "input_tokens": x.input_tokens,
    "input_mask": x.input_mask,
    "positions": sft_utils.build_positions_from_mask(pad_mask),
    "attention_mask": sft_utils.make_causal_attn_mask(pad_mask),
  }


# Each variant's learning rate in its own units: a weight-space H-RMS step
# for the SGD variant, a per-coordinate step for the AdamW variant.
PEAK_LEARNING_RATE = {"adaprelora": 3e-2, "adaprelora_adamw": 1e-2}


def _schedule(variant):
  peak = PEAK_LEARNING_RATE[variant]
  return optax.linear_schedule(peak, peak / 3, transition_steps=6)


def _trainer(model, tmp_path, max_steps, variant):
  # The recipe of docs/tunix.md: the scale qwix applies (alpha / rank) is given
  # as lora_scale, so the statistics are those of G itself.
  optimizer = optax.inject_hyperparams(getattr(ap, variant))(
    learning_rate=_schedule(variant), lora_scale=ALPHA / RANK, metrics=True
  )
  config = peft_trainer.TrainingConfig(
    eval_every_n_steps=1000,
    max_steps=max_steps,
    gradient_accumulation_steps=ACCUMULATION,
    checkpoint_root_directory=str(tmp_path / "checkpoints"),
    checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=2),
    metrics_logging_options=metrics_logger.MetricsLoggerOptions(log_dir=str(tmp_path / "logs")),
    pbar_description=None,
  )
  trainer = peft_trainer.PeftTrainer(model, optimizer, config).with_gen_model_input_fn(_model_input)
  # with_training_hooks returns None, unlike the other with_* methods.
  trainer.with_training_hooks(tunix_hooks.StepMetricsHook())
  return trainer


def _step_metric_history(trainer):
  """The optimizer metrics the hook logged: ``{name: (steps,) array}``."""
  names = ap.step_metrics(trainer.optimizer.opt_state)
  history = trainer.metrics_logger.get_metric_history
  return {name: np.asarray(history("", f"optimizer/{name}", "train")) for name in names}


def _lora_params(model):
  return jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.LoRAParam)))


@pytest.mark.parametrize("statistics", ["tangent", "exact"])
@pytest.mark.parametrize("variant", sorted(PEAK_LEARNING_RATE))
def test_peft_trainer_trains_and_resumes_bit_for_bit(tmp_path, variant, statistics):
  exact = statistics == "exact"
  steps = 6
  data = _batches(steps * ACCUMULATION)
  with jax.set_mesh(_mesh()):
    model = _lora_model(exact)
    plan = ap.plan_pairs(nnx.state(model, nnx.LoRAParam), strict=True, statistics=statistics)
    # The 7 projections of the layer, all found (N-D einsum factors included).
    assert len(plan.pairs) == 7
    assert all(pair.has_statistics == exact for pair in plan.pairs)
    trainer = _trainer(model, tmp_path / "straight", steps, variant)
    trainer.train(data)
    losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
    learning_rates = trainer.metrics_logger.get_metric_history("", "learning_rate", "train")
    metrics = _step_metric_history(trainer)
    last_metrics = jax.device_get(ap.step_metrics(trainer.optimizer.opt_state))
    trainer.close()
    straight = _lora_params(model)

    # The same run, stopped after 2 steps and resumed from its checkpoint.
    model = _lora_model(exact)
    first = _trainer(model, tmp_path / "resumed", 2, variant)
    first.train(data[: 2 * ACCUMULATION])
    first.close()
    model = _lora_model(exact)
    second = _trainer(model, tmp_path / "resumed", steps, variant)
    assert second.train_steps == 2
    # Tunix skips the examples the restored steps consumed: give it all.
    second.train(data)
    resumed_metrics = _step_metric_history(second)
    second.close()
    resumed = _lora_params(model)

  losses = np.asarray(losses)
  assert losses.shape == (steps,) and np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses
  # The logged learning rate is the schedule's, one per optimizer step
  # (MultiSteps counts optimizer steps, not micro-batches); Tunix reads it
  # from the state after the step, where inject_hyperparams holds the next
  # step's value (for the last step, buffered, the value before it).
  learning_rates = np.asarray(learning_rates)
  assert learning_rates.shape == (steps,)
  np.testing.assert_allclose(
    learning_rates[:-1], [_schedule(variant)(step + 1) for step in range(steps - 1)], rtol=1e-6
  )
  schedule = _schedule(variant)
  assert np.isclose(learning_rates[-1], [schedule(steps - 1), schedule(steps)]).any()
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  # The hook logged the optimizer's metrics once per optimizer step, the
  # last one that of the final state; the resumed run logged its 4 new steps,
  # bit for bit those of the straight run.
  expected = {"clip_factor/min", "factor_norm_b/max", "step_h_norm/mean", "skipped_pairs"}
  assert expected | ({"tangent_share/min"} if exact else set()) <= set(metrics)
  if not exact:
    assert "tangent_share/min" not in metrics
  for name, values in metrics.items():
    assert values.shape == (steps,), name
    np.testing.assert_array_equal(values[-1], last_metrics[name], err_msg=name)
    np.testing.assert_array_equal(resumed_metrics[name], values[2:], err_msg=name)
  assert np.all(metrics["skipped_pairs"] == 0)
  # b starts at zero; its norm grows with the steps.
  assert metrics["factor_norm_b/max"][0] == 0 and metrics["factor_norm_b/max"][-1] > 0
  if exact:
    assert np.all((metrics["tangent_share/min"] > 0) & (metrics["tangent_share/mean"] < 1.5))
  # The factors moved (b starts at zero).
  assert any(
    np.any(leaf != 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(straight)
    if "lora_b" in jax.tree_util.keystr(path)
  )


def test_yaml_config_trains_with_adaprelora(tmp_path):
  """Tunix's YAML machinery end to end with ``opt_type: adaprelora``
  (adaprelora_jax.tunix_cli): the optimizer and the training config from the
  YAML, a dummy Qwen3 (``create_dummy_model``) made LoRA by Tunix's own
  ``lora_config`` code, a few PeftTrainer steps; the logged learning rate is
  the YAML's schedule and the loss falls."""
  from tunix.cli.utils import model as tunix_model  # noqa: PLC0415
  from tunix.models import dummy_model_creator  # noqa: PLC0415

  from tests import test_tunix_cli  # noqa: PLC0415

  steps = 4
  pipeline = test_tunix_cli.pipeline(tmp_path, test_tunix_cli.SCHEDULED)
  with jax.set_mesh(_mesh()):
    base = dummy_model_creator.create_dummy_model(qwen3.Qwen3, _qwen3_config(), mesh=_mesh())
    model = tunix_model.apply_lora_to_model(
      base, None, pipeline.config["model_config"]["lora_config"]
    )
    optimizer = pipeline.create_optimizer("optimizer_config")
    config = peft_trainer.TrainingConfig(
      **pipeline.obtain_training_config_dict("training_config"),
      metrics_logging_options=metrics_logger.MetricsLoggerOptions(log_dir=str(tmp_path / "logs")),
      pbar_description=None,
    )
    trainer = peft_trainer.PeftTrainer(model, optimizer, config)
    trainer = trainer.with_gen_model_input_fn(_model_input)
    trainer.train(_batches(steps))
    losses = np.asarray(trainer.metrics_logger.get_metric_history("", "loss", "train"))
    learning_rates = trainer.metrics_logger.get_metric_history("", "learning_rate", "train")
    trainer.close()
  schedule = optax.linear_schedule(0.03, 0.01, 6)
  assert losses.shape == (steps,) and losses[-1] < losses[0], losses
  np.testing.assert_allclose(
    learning_rates[:-1], [schedule(step + 1) for step in range(steps - 1)], rtol=1e-6
  )
