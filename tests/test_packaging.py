"""Packaging: the version floors CI installs are the ones pyproject.toml
declares, and the optimizer runs without importing flax."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _floors_ci_installs() -> dict[str, str]:
  pins = {}
  for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
    if line and not line.startswith("#"):
      name, version = line.split("==")
      pins[name.strip()] = version.strip()
  return pins


def _declared_floors() -> dict[str, str]:
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  floors = {}
  for requirement in project["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(,<[0-9.]+)?", requirement)
    assert match, f"{requirement!r}: every dependency needs a tested floor (>=)"
    floors[match.group(1)] = match.group(2)
  return floors


def test_every_declared_floor_is_the_version_ci_installs():
  assert _declared_floors() == _floors_ci_installs()


def test_python_floor_is_the_one_jax_needs():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["requires-python"] == ">=3.11"


OPTIMIZERS_ON_A_PLAIN_TREE = """
import sys
import jax.numpy as jnp
import adaprelora_jax as ap
params = {"layer": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}, "head": jnp.ones(3)}
for tx in (ap.adaprelora(1e-2, metrics=True), ap.adaprelora_adamw(1e-2), ap.lora_plus(1e-2),
           ap.scaled_adamw(1e-2), ap.lora_pro(1e-2), ap.lora_rite(1e-2)):
  updates, state = tx.update(params, tx.init(params), params)
  assert jnp.isfinite(updates["layer"]["lora_a"]).all()
tx = ap.adaprelora(1e-2, metrics=True)
assert ap.step_metrics(tx.update(params, tx.init(params), params)[1])
print(sorted({name.split(".")[0] for name in sys.modules} & {"flax", "qwix", "tunix"}))
"""


def test_the_optimizers_do_not_import_flax():
  # flax's nnx labelling of state is looked up only when a leaf is an
  # nnx.Variable, which needs flax imported by the caller first.
  run = subprocess.run(
    [sys.executable, "-c", OPTIMIZERS_ON_A_PLAIN_TREE], capture_output=True, text=True
  )
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == "[]", run.stdout
