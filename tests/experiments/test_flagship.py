"""The flagship study: its Tunix Llama checkpoint and the smoke preset end to end.

The smoke preset trains through Tunix's PeftTrainer (two compilations): about
a minute on a loaded 2-core CPU.
"""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import adaprelora_jax as ap

pytest.importorskip("qwix")
pytest.importorskip("tunix")

from experiments import assets  # noqa: E402
from experiments import data  # noqa: E402
from experiments import flagship  # noqa: E402
from experiments import report  # noqa: E402
from experiments import sweeps  # noqa: E402
from experiments.models import llama  # noqa: E402
from experiments.tasks import TASKS  # noqa: E402
from experiments.tasks import flagship as flagship_task  # noqa: E402

pytestmark = [
  pytest.mark.filterwarnings("ignore::DeprecationWarning"),
  pytest.mark.usefixtures("tunix_sharding_environment"),
]


def test_checkpoint_record_matches_weights_and_current_data():
  with jax.set_mesh(llama.mesh()):
    model, size, chars = llama.load(assets.llama_checkpoint())
    record = json.loads(assets.llama_checkpoint().with_suffix(".json").read_text())
    corpus = data.shakespeare_chars()
    assert chars == corpus.vocab.chars
    assert record["model"] == dataclasses.asdict(size)
    assert record["parameters"] == llama.parameter_count(model)
    # The data pipeline still produces exactly what the model was trained on.
    assert record["data"]["sha256"] == corpus.sha256()
    windows = data.lm_eval_windows(corpus.test, 128)
    sample = windows[:: len(windows) // 32][:32]
    # Unigram entropy of the text is above 4.5 bits.
    assert 1.0 < llama.bits_per_char(model, sample) < 3.0 and record["final_val_bpc"] < 3.0


def test_save_load_round_trip(tmp_path):
  size = llama.LlamaSize(
    vocab_size=11,
    num_layers=1,
    embed_dim=16,
    hidden_dim=32,
    num_heads=2,
    head_dim=8,
    num_kv_heads=1,
  )
  with jax.set_mesh(llama.mesh()):
    model = llama.build(size, seed=3)
    llama.save(model, size, tmp_path / "tiny.safetensors", "abcdefghij")
    loaded, loaded_size, chars = llama.load(tmp_path / "tiny.safetensors")
    windows = np.arange(20).reshape(2, 10) % 11
    assert loaded_size == size and chars == "abcdefghij"
    # float16 storage: equal to rounding.
    np.testing.assert_allclose(
      llama.next_token_nats(loaded, windows), llama.next_token_nats(model, windows), rtol=1e-2
    )


def test_time_to_target_reads_each_seed_curve(tmp_path):
  def entry(values, seconds):
    return {
      "best_lr": 0.1,
      "best_mean": float(np.mean([v[-1] for v in values])),
      "best_std": 0.0,
      "lrs": {
        "0.1": {
          "curves": {
            "eval_step": [10, 20, 30],
            "eval_bpc": values,
            "eval_seconds": seconds,
            "train_loss": [[1.0] * 30] * len(values),
          }
        }
      },
    }

  results = {
    "metric": "bpc",
    "higher_is_better": False,
    "optimizers": {
      "adamw": entry([[3.0, 2.5, 2.0], [3.0, 2.4, 2.2]], [[5, 6, 7], [5, 7, 9]]),
      "fast": entry([[2.0, 1.9, 1.8], [2.5, 2.05, 1.9]], [[4, 5, 6], [4, 6, 8]]),
      "slow": entry([[3.0, 2.9, 2.8], [3.0, 2.9, 2.8]], [[5, 10, 15], [5, 10, 15]]),
    },
  }
  summary = report.time_to_target(results, flagship.REFERENCE, flagship.TOKENS_PER_STEP)
  assert summary["target"] == pytest.approx(2.1)
  rows = summary["optimizers"]
  assert rows["adamw"]["reached"] == 1 and rows["adamw"]["steps"] == 30
  assert rows["fast"]["reached"] == 2 and rows["fast"]["steps"] == 15
  assert rows["fast"]["seconds"] == pytest.approx(5)
  assert rows["slow"]["reached"] == 0 and rows["slow"]["steps"] is None
  # Steady state: 20 steps of 8 x 128 tokens over the last two intervals.
  assert rows["slow"]["tokens_per_second"] == pytest.approx(20 * 1024 / 10)
  # The long leg's RESULTS.md section and figure.
  results.update(task="x", time_to_target=summary, environment={"commit": "abc", "date": "d"})
  section = report.long_leg_markdown(results)
  assert "| slow | 0.1 | 2.8000 ± 0.0000 | not reached | not reached | 0/2 | 2048 |" in section
  assert report.plot_long(results, tmp_path).exists()


def test_smoke_preset_trains_writes_results_and_resumes(tmp_path, monkeypatch):
  names = list(flagship.SMOKE_OPTIMIZERS)
  paths = dict(
    results_dir=tmp_path / "results",
    cache=tmp_path / "runs",
    checkpoints=tmp_path / "ckpt",
    progress=False,
  )
  results = sweeps.sweep("flagship", names, "smoke", **paths)
  written = json.loads((tmp_path / "results" / "flagship_smoke.json").read_text())
  assert written["optimizers"] == results["optimizers"]
  for key in ("task", "model", "dataset", "metric", "higher_is_better", "environment"):
    assert key in written
  budget = flagship_task.TASK.presets["smoke"]
  with jax.set_mesh(llama.mesh()):
    base, _, _ = llama.load(assets.llama_checkpoint())
    base_bpc = flagship_task.evaluate(base, budget)["bpc"]
  for name in names:
    (lr_entry,) = results["optimizers"][name]["lrs"].values()
    curves = lr_entry["curves"]
    (losses,) = curves["train_loss"]
    assert len(losses) == budget.steps and all(map(math.isfinite, losses))
    assert curves["eval_step"] == [2, 4]
    (seconds,) = curves["eval_seconds"]
    assert 0 < seconds[0] < seconds[1]
    assert all(map(math.isfinite, lr_entry["seeds"]))
  # A few AdamW steps on Milton already lower the base model's held-out loss.
  # (AdaPreLoRA's registry default, 1e-2, is far too large a weight-space step
  # for weights of std 0.02: it is checked for finiteness only, the sweep
  # finds its learning rate.)
  assert results["optimizers"]["adamw"]["best_mean"] < base_bpc
  summary = report.time_to_target(results, flagship.REFERENCE, flagship.TOKENS_PER_STEP)
  assert summary["optimizers"]["adamw"]["reached"] == 1
  assert summary["optimizers"]["adamw"]["tokens_per_second"] > 0

  # A second invocation reuses every stored run instead of training again.
  def refuse(*args, **kwargs):
    raise AssertionError("retrained a stored run")

  monkeypatch.setitem(TASKS, "flagship", dataclasses.replace(TASKS["flagship"], trainer=refuse))
  again = sweeps.sweep("flagship", names, "smoke", **paths)
  assert again["optimizers"] == results["optimizers"]


def test_flagship_model_builds_with_exact_statistics():
  """adaprelora_jax.qwix.LoraProvider on the Tunix Llama: every adapted
  projection carries exact statistics, read by the default pairing, and a
  backward pass fills them with positive, finite values."""
  with jax.set_mesh(llama.mesh()):
    model, wrt = flagship_task.build_model(0, exact_statistics=True)
    params = nnx.state(model, wrt)
    plan = ap.plan_pairs(params, strict=True, statistics="exact")
    assert len(plan.pairs) == len(flagship_task.PROJECTIONS) * len(model.layers)
    assert all(pair.has_statistics for pair in plan.pairs)
    windows = np.arange(2 * 33).reshape(2, 33) % 60
    grads = nnx.grad(flagship_task.loss_fn, argnums=nnx.DiffState(0, wrt))(model, windows)
  probes = [
    np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.as_pure(grads))[0]
    if "grad_sq" in str(path)
  ]
  assert len(probes) == 2 * len(plan.pairs)
  assert all(np.all(np.isfinite(p)) and np.all(p >= 0) and p.max() > 0 for p in probes)
