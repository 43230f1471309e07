"""The version floors CI installs are the ones pyproject.toml declares."""

import re
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
