"""The package as a user installs it: the wheel and the sdist hold every module, config and weight file, and the
installed wheel segments the shipped sample with the checkout off the path.

The build runs on a copy of the files a clone holds (tracked, and new files git does not ignore), so the checkout
gets no ``build/`` folder; ``--no-build-isolation`` uses the installed setuptools (the ``test`` extra), offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # builds the wheel and installs it in fresh virtual environments

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "bundle" / "sample_data"


def _git(*args: str) -> list[str]:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"needs a git checkout (git {' '.join(args)}: {result.stderr.strip()[:200]})")
    return result.stdout.splitlines()


def _run(command: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, timeout=timeout,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}"
    return result


@pytest.fixture(scope="module")
def package_files() -> set[str]:
    """Every tracked file of the package (modules, model configs, weights)."""
    if shutil.which("git") is None:
        pytest.skip("needs git to list the package's tracked files")
    files = {name for name in _git("ls-files", "causalclipseg") if (ROOT / name).is_file()}
    assert any(name.endswith(".pt") for name in files) and any(name.endswith(".json") for name in files)
    return files


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory, package_files) -> Path:
    """The files a clone of this checkout holds, copied to a temporary folder."""
    tree = tmp_path_factory.mktemp("source")
    for name in _git("ls-files", "--cached", "--others", "--exclude-standard"):
        source = ROOT / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    return tree


@pytest.fixture(scope="module")
def wheel(source_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir",
          str(out), str(source_tree)], cwd=out)
    (found,) = out.glob("causalclipseg-*.whl")
    return found


@pytest.fixture(scope="module")
def sdist(source_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    script = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    _run([sys.executable, "-c", script, str(out)], cwd=source_tree)
    (found,) = out.glob("causalclipseg-*.tar.gz")
    return found


def test_wheel_holds_every_module_config_and_weight(wheel, package_files):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = sorted(package_files - names)
    assert not missing, f"not in {wheel.name}: {missing}"


def test_sdist_holds_every_module_config_and_weight(sdist, package_files):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = sorted(package_files - names)
    assert not missing, f"not in {sdist.name}: {missing}"
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"} <= names


def test_installed_wheel_predicts_outside_the_checkout(wheel, tmp_path):
    """The wheel installed into a bare folder, imported from there (not through the editable install's finder, which
    is on ``sys.path`` too), segments the shipped sample from another working directory with its own weights.

    ``python -m causalclipseg.cli predict ...`` is run through ``runpy`` (what ``-m`` does) so that the same process
    then prints where the package, its ``model`` subpackage and the default weights were loaded from.
    """
    site, elsewhere, out = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
         cwd=elsewhere)
    (image,) = SAMPLE.glob("*.png")
    caption = (SAMPLE / "caption.txt").read_text(encoding="utf-8").strip()  # QaTa-COV19's: the viewer's side
    script = ("import runpy, sys\n"
              "try:\n"
              "    runpy.run_module('causalclipseg.cli', run_name='__main__', alter_sys=True)\n"
              "finally:\n"
              "    from causalclipseg.factory import DEFAULT_CHECKPOINT\n"
              "    modules = sys.modules['causalclipseg'].__file__, sys.modules['causalclipseg.model'].__file__\n"
              "    print('loaded:', *modules, DEFAULT_CHECKPOINT)\n")
    result = _run([sys.executable, "-c", script, "predict", str(image), "--prompt", caption, "--prompt-side", "viewer",
                   "--output-dir", str(out)], cwd=elsewhere, PYTHONPATH=str(site))
    loaded = next(line for line in result.stdout.splitlines() if line.startswith("loaded: ")).split()[1:]
    assert len(loaded) == 3 and Path(loaded[2]).is_file()
    for path in loaded:
        assert Path(path).resolve().is_relative_to(site.resolve()), f"loaded {path}, not the installed wheel's copy"
    mask = np.array(Image.open(out / f"{image.stem}_mask.png"))
    assert mask.shape == np.array(Image.open(image)).shape[:2] and set(np.unique(mask)) <= {0, 255} and mask.any()
