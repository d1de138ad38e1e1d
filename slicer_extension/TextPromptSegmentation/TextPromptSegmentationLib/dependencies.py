"""Installing the package into Slicer's Python without replacing what Slicer itself ships.

pip may upgrade or downgrade a dependency to satisfy a new package; in Slicer that breaks the application
(numpy, VTK, SimpleITK, ...). A constraints file pins every protected package that is installed to its
current version, so pip either installs around them or fails with a message, but never replaces them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["PROTECTED_PACKAGES", "IO_REQUIREMENTS", "PACKAGE_MODULE", "missing_requirements",
           "missing_in_interpreter", "write_constraints", "pip_install_arguments"]

# Distributions Slicer ships and depends on; never to be replaced by an extension's install.
PROTECTED_PACKAGES = (
    "numpy", "scipy", "SimpleITK", "vtk", "requests", "urllib3", "certifi", "charset-normalizer", "idna",
    "pydicom", "dicomweb-client", "packaging", "setuptools", "pip", "wheel", "six", "pillow", "h5py",
)

# Module -> pip requirement for what the Lib needs to write and read volumes (both pure Python).
IO_REQUIREMENTS = {"nibabel": "nibabel", "nrrd": "pynrrd"}
# The module the local backend runs; its requirement is a setting (a name on PyPI, a wheel or a source folder).
PACKAGE_MODULE = "causalclipseg"


def missing_requirements(requirements: Mapping[str, str],
                         find_spec: Callable[[str], object | None] = importlib.util.find_spec) -> list[str]:
    """The pip requirements, from a mapping module -> requirement, whose module is not importable here.

    Checked without importing anything (Slicer's process must not import torch).
    """
    return [requirement for module, requirement in requirements.items() if find_spec(module) is None]


def missing_in_interpreter(python: str | os.PathLike, requirements: Mapping[str, str],
                           env: Mapping[str, str] | None = None, timeout: float = 60.0) -> list[str]:
    """:func:`missing_requirements` as another interpreter sees them (the one set under Advanced), asked in a
    process of its own that imports nothing.

    It runs in the temporary folder, as the model process does, so that a package folder in Slicer's working folder
    does not count.

    Raises:
        RuntimeError: if the interpreter cannot be run or does not answer within ``timeout`` seconds.
    """
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    try:
        result = subprocess.run([os.fspath(python), "-c", code, *requirements], capture_output=True, text=True,
                                timeout=timeout, cwd=tempfile.gettempdir(), env=None if env is None else dict(env))
        missing = set(json.loads(result.stdout.strip().splitlines()[-1])) if result.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as err:
        raise RuntimeError(f"the Python interpreter {python} could not be asked for its packages: {err}") from err
    if missing is None:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RuntimeError(f"the Python interpreter {python} could not be asked for its packages: {last}")
    return [requirement for module, requirement in requirements.items() if module in missing]


def write_constraints(path: str | os.PathLike, packages: Sequence[str] = PROTECTED_PACKAGES,
                      version_of: Callable[[str], str] = importlib.metadata.version) -> Path:
    """Write a pip constraints file pinning each installed package of ``packages`` to its current version.

    Packages that are not installed are left free. Returns the path.
    """
    lines = ["# Written by TextPromptSegmentation: keep the packages Slicer ships at their versions."]
    for package in packages:
        try:
            lines.append(f"{package}=={version_of(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pip_install_arguments(requirements: Sequence[str], constraints_file: str | os.PathLike) -> list[str]:
    """Arguments for ``pip install`` (and ``slicer.util.pip_install``, which takes the same list).

    Raises:
        ValueError: if ``requirements`` is empty or an entry looks like an option (starts with ``-``).
    """
    if not requirements:
        raise ValueError("nothing to install")
    options = [r for r in requirements if r.strip().startswith("-")]
    if options:
        raise ValueError(f"requirements must be package names, paths or URLs, not options: {options}")
    return [*requirements, "--constraint", str(constraints_file)]
