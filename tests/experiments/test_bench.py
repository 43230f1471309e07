"""Smoke tests of the benchmark scripts' floor model and tables (no timings asserted)."""

import pytest

from experiments import bench_step
from experiments import bench_train
from experiments import benchmarking
from experiments import profile_step


def test_cost_model_counts_products_and_passes():
  model = benchmarking.CostModel(products_a=2, products_b=3, passes=4)
  work = benchmarking.model_work(model, [(10, 20)], rank=4)
  assert work["flops"] == 2 * 16 * (2 * 10 + 3 * 20)
  assert work["bytes"] == 4 * 4 * (10 + 20) * 4


def test_every_benchmarked_optimizer_has_a_cost_model():
  assert set(benchmarking.OPTIMIZERS) <= set(benchmarking.COST_MODELS)


def test_machine_measurement_and_table_at_tiny_sizes():
  shapes = [(8, 8), (8, 16)]
  machine = benchmarking.measure_machine(shapes, rank=2, repeats=2)
  assert machine["matmul_flops_per_second"] > 0 and machine["bytes_per_second"] > 0
  results = {
    "adamw": {
      "step_seconds": 1e-3,
      "compile_seconds": 0.1,
      "state_bytes": 8,
      "step_ratio_vs_adamw": 1.0,
      "state_ratio_vs_adamw": 1.0,
    }
  }
  bench_step.add_floors(results, machine, shapes, rank=2)
  assert results["adamw"]["floor_seconds"] > 0
  table = bench_step.format_table({"machine": machine, "results": results})
  assert "step / floor" in table and "| adamw |" in table


def test_train_table_formats_a_report():
  rows = [
    {"batch": 2, "tokens": 4, "optimizer": name, "seconds": 0.01, "ratio_vs_adamw": ratio}
    for name, ratio in (("adamw", 1.0), ("adaprelora", 1.01))
  ]
  report = {
    "train_step": rows,
    "backward": [
      {
        "batch": 2,
        "tokens": 4,
        "plain_seconds": 0.01,
        "exact_seconds": 0.012,
        "exact_over_plain": 1.2,
      }
    ],
  }
  table = bench_train.format_tables(report)
  assert "| adaprelora | 1.01 |" in table and "| 2×4 | 10 | 12 | 1.20 |" in table


def test_train_step_runs_every_layer_kind_on_the_pretrained_model():
  """One tiny round of the real benchmark: adaprelora on the plain nnx LoRA
  layers and on the exact-statistics layers, with the classifier head as a
  non-LoRA parameter of the same ``nnx.State``."""
  report = bench_train.run([(2, 8)], None, rounds=1, names=["adaprelora_tangent", "adaprelora"])
  optimizers = [row["optimizer"] for row in report["train_step"]]
  assert optimizers == ["adamw", "adaprelora_tangent", "adaprelora"]
  assert all(row["seconds"] > 0 for row in report["train_step"])


def test_flagship_train_step_runs_with_both_providers():
  """One tiny round of the flagship benchmark: the Tunix Llama with qwix's
  provider (tangent statistics) and adaprelora_jax's (exact statistics)."""
  pytest.importorskip("tunix")
  report = bench_train.run_flagship([(1, 16)], rounds=1)
  optimizers = [row["optimizer"] for row in report["train_step"]]
  assert optimizers == list(bench_train.FLAGSHIP_OPTIMIZERS)
  assert all(row["seconds"] > 0 for row in report["train_step"])
  assert report["backward"][0]["exact_seconds"] > 0


def test_profile_counts_the_cost_models_products_in_the_compiled_step():
  # The HLO's executed dot flops are the cost model's d×r×r products plus
  # r×r work (a few % at this d/r); a miscounted model or an extra product
  # pass in the step would move the ratio out of the band.
  report = profile_step.run(
    hidden=128, ffn=192, layers=2, rank=4, repeats=1, compile_layers=(1,), compile_trials=1
  )
  for statistics in ("exact", "tangent"):
    work = report["counted"][statistics]
    assert 1.0 <= work["dot_flops"]["always"] / work["model_flops"] < 1.1
    assert work["dot_flops"]["projection branch"] > 0
    assert work["lapack_calls"]
  assert set(report["timings"]) == {
    f"{statistics}: {program}"
    for statistics in ("exact", "tangent")
    for program in ("step", "step, one group per pair", "products", "stacking")
  } | {"adamw"}
  assert {row["optimizer"] for row in report["compile"]} == {
    "adamw",
    "adaprelora",
    "adaprelora, project_gradients=False",
  }
  assert "| exact: products |" in profile_step.format_report(report)


def test_collectives_reads_tuple_all_reduces_of_an_hlo():
  from experiments import collectives  # noqa: PLC0415

  hlo = (
    "  %all-reduce.8 = (f32[256,8]{1,0}, /*index=1*/bf16[4]{0}) all-reduce(%a, %b), "
    "to_apply=%add\n"
    "  %ag = f32[16,8]{1,0} all-gather-start(%c), dimensions={0}\n"
    "  %x = f32[2]{0} add(%d, %e)\n"
  )
  found = collectives.collectives(hlo)
  assert found["all-reduce"] == {"count": 1, "bytes": 256 * 8 * 4 + 4 * 2, "largest": 8192}
  assert found["all-gather"]["count"] == 1 and "add" not in found
