"""The documentation site builds without warnings, its examples pass as
doctests, and its API page renders in a real (headless) browser."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Where the API page's screenshot is kept after the run (ignored by git).
SCREENSHOT = DOCS / "_build" / "api.png"
# Flags for a headless Chromium on a machine with a closed network.
CHROMIUM_FLAGS = (
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
)


def _sphinx(builder: str, out: Path) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder]
  return subprocess.run([*command, str(DOCS), str(out)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def html(tmp_path_factory):
  out = tmp_path_factory.mktemp("html")
  result = _sphinx("html", out)
  assert result.returncode == 0, result.stderr
  return out


def test_site_builds_without_warnings(html):
  for page in ("index", "api", "usage", "tunix", "results", "update_geometry", "design"):
    assert (html / f"{page}.html").is_file(), page
  assert (html / "_autosummary" / "adaprelora_jax.step_metrics.html").is_file()


def test_examples_run_as_doctests(tmp_path):
  result = _sphinx("doctest", tmp_path)
  report = (tmp_path / "output.txt").read_text() if (tmp_path / "output.txt").exists() else ""
  assert result.returncode == 0, result.stderr + report
  assert "0 failures in tests" in report
  # The summary at the end counts every example of every page.
  assert int(re.search(r"(\d+) tests\n\s+0 failures in tests", report).group(1)) >= 10


def _chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  assert browser, "Chromium is needed (Debian: apt-get install chromium)"
  return subprocess.run(
    [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments],
    capture_output=True,
    text=True,
    timeout=180,
    check=True,
  )


def test_api_page_renders_in_headless_chromium(html, tmp_path):
  page = (html / "api.html").as_uri()
  dom = _chromium("--dump-dom", page, profile=tmp_path / "profile").stdout
  # The rendered page holds the API tables: one per section, a row per public
  # name linking to its page, with the docstring's first line.
  assert dom.count('class="autosummary') >= 8
  for name in ("adaprelora", "adaprelora_adamw", "step_metrics", "qwix.LoraProvider"):
    assert f'href="_autosummary/adaprelora_jax.{name}.html"' in dom, name
  assert "AdaPreLoRA AdamW: AdamW" in dom
  SCREENSHOT.parent.mkdir(exist_ok=True)
  _chromium(
    f"--screenshot={SCREENSHOT}", "--window-size=1280,1600", page, profile=tmp_path / "profile"
  )
  image = matplotlib.image.imread(SCREENSHOT)
  assert image.shape[:2] == (1600, 1280)
  # Not a blank page: text and tables give the pixels spread.
  assert image[..., :3].std() > 0.05
  print(f"API page screenshot: {SCREENSHOT}")
