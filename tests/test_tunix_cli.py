"""adaprelora_jax.tunix_cli: this library's optimizers from a Tunix YAML config.

Fast checks of the optimizer section; the end-to-end run (a Tunix
``PeftTrainer`` on a dummy Qwen3 built from the same YAML) is in
tests/test_tunix.py (slow).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaprelora_jax as ap

pytest.importorskip("tunix")
from adaprelora_jax import tunix_cli  # noqa: E402  (needs tunix)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONFIG = """\
model_config:
  model_name: "qwen3-0.6b"
  model_id: "Qwen/Qwen3-0.6B"
  model_source: "huggingface"
  intermediate_ckpt_dir: "/nonexistent/checkpoint"
  model_display: false
  mesh:
    shape: "(1,1)"
    axis_names: "('fsdp','tp')"
  lora_config:
    module_path: ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"
    rank: 4
    alpha: 8.0
tokenizer_config:
  tokenizer_path: "/nonexistent/tokenizer"
  tokenizer_type: "huggingface"
  add_bos: false
  add_eos: false
optimizer_config:
{optimizer}
training_config:
  max_steps: 4
  eval_every_n_steps: 100
  gradient_accumulation_steps: 1
batch_size: 4
"""

SCHEDULED = """\
  opt_type: "adaprelora"
  schedule_type: "linear_schedule"
  init_value: 0.03
  end_value: 0.01
  transition_steps: 6
  lora_scale: 2.0
  statistics: "tangent"
  project_gradients: true
"""


def pipeline(tmp_path, optimizer: str) -> tunix_cli.PeftPipeline:
  """Tunix's config machinery on a YAML file whose optimizer section is ``optimizer``."""
  path = tmp_path / "config.yaml"
  path.write_text(CONFIG.format(optimizer=optimizer))
  return tunix_cli.PeftPipeline(["peft", str(path)])


def _params():
  key_a, key_b = jax.random.split(jax.random.key(0))
  return {
    "layer": {
      "lora_a": jax.random.normal(key_a, (6, 2)),
      "lora_b": jax.random.normal(key_b, (2, 5)),
    }
  }


def test_named_optimizer_with_a_schedule_and_static_arguments(tmp_path):
  tx = pipeline(tmp_path, SCHEDULED).create_optimizer("optimizer_config")
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  # The numbers are injected (and logged by Tunix), the rest static.
  assert {"learning_rate", "lora_scale"} <= set(state.hyperparams)
  assert not {"statistics", "project_gradients"} & set(state.hyperparams)
  updates, state = jax.jit(tx.update)(grads, state, params)
  expected = optax.inject_hyperparams(ap.adaprelora, static_args=("statistics",))(
    learning_rate=optax.linear_schedule(0.03, 0.01, 6), lora_scale=2.0, statistics="tangent"
  )
  want, _ = expected.update(grads, expected.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, want)
  # The learning rate is the YAML's schedule, step by step.
  np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.03, rtol=1e-6)
  _, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.03 - 0.02 / 6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(tunix_cli.OPTIMIZERS))
def test_every_optimizer_is_selectable(tmp_path, name):
  tx = pipeline(tmp_path, f'  opt_type: "{name}"\n  learning_rate: 0.001\n').create_optimizer(
    "optimizer_config"
  )
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(updates))


def test_other_names_go_to_optax(tmp_path):
  tx = pipeline(tmp_path, '  opt_type: "adamw"\n  learning_rate: 0.001\n').create_optimizer(
    "optimizer_config"
  )
  assert "learning_rate" in tx.init(_params()).hyperparams


def test_unknown_argument_is_named(tmp_path):
  section = '  opt_type: "adaprelora"\n  learning_rate: 0.001\n  beta_one: 0.9\n'
  with pytest.raises(
    ValueError, match="'beta_one' is not an argument of adaprelora_jax.adaprelora"
  ):
    pipeline(tmp_path, section).create_optimizer("optimizer_config")


def test_missing_learning_rate_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="give learning_rate, or schedule_type"):
    pipeline(tmp_path, '  opt_type: "adaprelora"\n').create_optimizer("optimizer_config")
