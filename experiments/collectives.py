"""Collectives of the flagship's train step under data parallelism, per statistics mode.

The flagship's Tunix Llama 3 (qwix LoRA on its 7 projections, 28 pairs) on a
mesh of 8 emulated CPU devices, Tunix's axes ``("fsdp", "tp") = (8, 1)``:
Tunix's default sharding puts the batch of every activation on ``fsdp``; the
weights stay replicated (importing ``tunix.models`` turns flax's eager
variable sharding off), so this is data parallelism. For each
configuration the jitted fwd + bwd + update is compiled and its optimized HLO
read: every collective, with its count and bytes. The configurations:

* AdamW on ``qwix.LoraProvider`` (no statistics): the factor gradients' own
  all-reduce, the baseline;
* adaprelora with tangent statistics (``qwix.LoraProvider``);
* adaprelora with exact statistics of the global batch
  (:class:`adaprelora_jax.qwix.LoraProvider`);
* adaprelora with per-shard statistics
  (``LoraProvider(..., statistics_batch_axes=("fsdp",))``).

Nothing is timed: emulated devices share two cores. Usage::

  python -m experiments.collectives

Writes ``experiments/results/collectives.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from experiments import set_xla_flag

# Before the backend starts: the emulated devices.
set_xla_flag("--xla_force_host_platform_device_count", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import adaprelora_jax as ap  # noqa: E402
from experiments.benchmarking import functional  # noqa: E402
from experiments.paths import RESULTS  # noqa: E402
from experiments.paths import environment  # noqa: E402

DEVICES = 8

_COLLECTIVE = re.compile(
  r"=\s*(?P<shape>\(?[^=]*?\)?)\s*(?P<kind>all-reduce|all-gather|all-to-all|"
  r"collective-permute|reduce-scatter)(?:-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>f64|f32|bf16|f16|s32|u32|s8|u8|pred)\[(?P<dims>[\d,]*)\]")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def collectives(hlo: str) -> dict[str, dict[str, float]]:
  """``{kind: {"count": n, "bytes": b, "largest": b}}`` of an optimized HLO text."""
  found: dict[str, dict[str, float]] = {}
  # Tuple shapes carry /*index=n*/ comments.
  hlo = re.sub(r"/\*.*?\*/", "", hlo)
  for match in _COLLECTIVE.finditer(hlo):
    sizes = [
      _BYTES[array["dtype"]] * int(np.prod([int(d) for d in array["dims"].split(",") if d]))
      for array in _ARRAY.finditer(match["shape"])
    ]
    entry = found.setdefault(match["kind"], {"count": 0, "bytes": 0, "largest": 0})
    entry["count"] += 1
    entry["bytes"] += sum(sizes)
    entry["largest"] = max(entry["largest"], max(sizes, default=0))
  return found


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh(
    (DEVICES, 1),
    ("fsdp", "tp"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=jax.devices()[:DEVICES],
  )


CONFIGURATIONS = {
  "adamw": ("qwix", lambda: optax.adamw(3e-3)),
  "adaprelora, tangent statistics": ("qwix", lambda: ap.adaprelora(3e-4)),
  "adaprelora, exact statistics (global batch)": ("exact", lambda: ap.adaprelora(3e-4)),
  "adaprelora, per-shard statistics": ("per_shard", lambda: ap.adaprelora(3e-4)),
}


def run(batch: int, window: int) -> dict:
  from experiments.tasks import flagship as task  # noqa: PLC0415

  task._tunix().env_utils.setup_sharding_environment()
  rows = []
  mesh = _mesh()
  with jax.set_mesh(mesh):
    for name, (provider, factory) in CONFIGURATIONS.items():
      options = {"statistics_batch_axes": ("fsdp",)} if provider == "per_shard" else {}
      model, _ = task.build_model(0, provider != "qwix", **options)
      loss_fn, trainable, rest = functional(model, nnx.LoRAParam, task.loss_fn)
      tx = factory()
      state = tx.init(trainable)
      rng = np.random.default_rng(0)
      windows = rng.integers(1, model.config.vocab_size, size=(batch, window + 1)).astype(np.int32)
      windows = jax.device_put(windows, jax.NamedSharding(mesh, jax.P("fsdp", None)))

      @jax.jit
      def step(trainable, state, rest, windows, tx=tx, loss_fn=loss_fn):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, rest, windows)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

      hlo = step.lower(trainable, state, rest, windows).compile().as_text()
      found = collectives(hlo)
      print(f"  {name}: {found}", file=sys.stderr, flush=True)
      rows.append({"configuration": name, "collectives": found})
  lora_numbers = [
    int(np.prod(leaf.shape))
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.as_pure(trainable))
    if "_lora_" in jax.tree_util.keystr(path)
  ]
  return {
    "config": {
      "model": "flagship Tunix Llama 3 (experiments/tasks/flagship.py)",
      "mesh": {"fsdp": DEVICES, "tp": 1},
      "batch": batch,
      "window": window,
      "lora_factor_bytes": 4 * sum(lora_numbers),
    },
    "rows": rows,
    "environment": environment(),
  }


def format_table(report: dict) -> str:
  base = report["rows"][0]["collectives"].get("all-reduce", {"bytes": 0})["bytes"]
  lines = [
    "| configuration | all-reduce ops | all-reduce MB | / "
    + report["rows"][0]["configuration"]
    + " | largest array (KB) | other collectives |",
    "|---|---:|---:|---:|---:|---|",
  ]
  for row in report["rows"]:
    found = dict(row["collectives"])
    reduce = found.pop("all-reduce", {"count": 0, "bytes": 0, "largest": 0})
    others = ", ".join(f"{kind} ×{entry['count']}" for kind, entry in found.items()) or "none"
    ratio = reduce["bytes"] / base if base else float("nan")
    lines.append(
      f"| {row['configuration']} | {reduce['count']} | {reduce['bytes'] / 1e6:.2f} | "
      f"{ratio:.1f} | {reduce['largest'] / 1e3:.0f} | {others} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--output", type=Path, default=RESULTS / "collectives.json")
  args = parser.parse_args()
  if len(jax.devices()) < DEVICES:
    raise SystemExit(f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  report = run(args.batch, args.window)
  print(format_table(report))
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
