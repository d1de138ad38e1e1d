"""The Slicer extension's module in a real, headless Slicer scene: ``slicer-core`` with the harness of
``headless_slicer.py``, the module file imported unchanged, the model run by the project's interpreter.

This suite has its own virtual environment (Slicer's Python is separate from the model's, as in Slicer) and its own
``pytest.ini``; the main suite does not collect it. ``run.sh`` beside this file creates the environment and runs it.

- ``CAUSALCLIPSEG_PYTHON``: the interpreter that has ``causalclipseg`` (the project's environment). The Logic runs
  the model with it (``pythonExecutable``); the ``PythonSlicer`` stand-in execs it. Without it the tests that run
  the model skip, saying so; the storage-node tests run anyway.
- ``../shared/data/qata_cov19`` beside the repository: a QaTa-COV19 validation X-ray; its test skips without it.

Model runs are few and inputs small: one ``causalclipseg predict`` call makes the reference masks of every input
(:class:`ReferenceRun`), each input is segmented once through the Logic (whose model process stays loaded between
runs), and the reference run and the MONAI Label server start in the background at the beginning of the session, so
that their start-up overlaps the first Logic run's.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
if importlib.util.find_spec("slicer") is not None:  # else each test module skips, saying why
    import headless_slicer
    import numpy as np
    import scene
    import slicer

MODEL_PYTHON_VARIABLE = "CAUSALCLIPSEG_PYTHON"


# ------------------------------------------------------------------------------------------ the application
@pytest.fixture(scope="session", autouse=True)
def headless(tmp_path_factory: pytest.TempPathFactory) -> headless_slicer.HeadlessSlicer:
    """The headless application, installed before the module is imported."""
    return headless_slicer.install(tmp_path_factory.mktemp("slicer_temporary_path"))


@pytest.fixture(scope="session")
def module(headless: headless_slicer.HeadlessSlicer):
    """The module file, imported unchanged from ``slicer_extension/`` as Slicer imports a scripted module (its folder
    on ``sys.path``)."""
    sys.path.insert(0, str(scene.MODULE_DIR))
    import TextPromptSegmentation

    assert Path(TextPromptSegmentation.__file__).resolve() == scene.MODULE_FILE.resolve()
    return TextPromptSegmentation


@pytest.fixture(autouse=True)
def _empty_scene(headless: headless_slicer.HeadlessSlicer) -> Iterator[None]:
    """Each test starts from an empty scene, as after *File > Close scene*."""
    headless.scene.Clear(0)
    yield
    headless.scene.Clear(0)


@pytest.fixture(scope="session", autouse=True)
def _end_leftover_processes() -> Iterator[None]:
    """At the end, end the process groups the module left running (a model worker waiting for its next run), as
    Slicer's exit does, so that the test process leaves nothing behind."""
    yield
    if not Path("/proc").is_dir():
        return
    own = os.getpgid(0)
    for pgid in {info.pgid for info in scene.descendants().values()} - {own}:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------------------ the model's Python
@dataclass(frozen=True)
class ModelPython:
    """The interpreter that has ``causalclipseg`` and where the package is (found without importing it)."""

    executable: str
    package_origin: str

    def has(self, package: str) -> bool:
        """Whether ``package`` can be imported by this interpreter (looked up, not imported)."""
        return subprocess.run([self.executable, "-c", f"import importlib.util as u, sys; "
                               f"sys.exit(u.find_spec({package!r}) is None)"], timeout=60).returncode == 0


@functools.cache
def find_model_python() -> ModelPython | str:
    """``$CAUSALCLIPSEG_PYTHON`` as a :class:`ModelPython`, or why there is none (a sentence)."""
    executable = os.environ.get(MODEL_PYTHON_VARIABLE, "").strip()
    if not executable:
        return (f"{MODEL_PYTHON_VARIABLE} is not set: set it to the Python that has causalclipseg (the project's "
                f"environment, e.g. {MODEL_PYTHON_VARIABLE}=.venv/bin/python) to run the model from the scene")
    executable = os.path.abspath(shutil.which(executable) or executable)
    if not os.path.isfile(executable):
        return f"{MODEL_PYTHON_VARIABLE}={executable} does not exist"
    answer = subprocess.run([executable, "-c", "import importlib.util as u; s = u.find_spec('causalclipseg'); "
                             "print(s.origin if s else '')"], capture_output=True, text=True, timeout=60)
    if answer.returncode != 0 or not answer.stdout.strip():
        return f"{MODEL_PYTHON_VARIABLE}={executable} cannot find causalclipseg {answer.stderr.strip()}"
    return ModelPython(executable, answer.stdout.strip())


@pytest.fixture(scope="session")
def model_python() -> ModelPython:
    """``$CAUSALCLIPSEG_PYTHON``; skips when it is not set, fails when it is set but cannot run the package."""
    found = find_model_python()
    if isinstance(found, str):
        if os.environ.get(MODEL_PYTHON_VARIABLE, "").strip():
            pytest.fail(found)
        pytest.skip(found)
    return found


def write_script(path: Path, body: str) -> Path:
    """An executable POSIX shell script."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def pythonslicer_on_path(model_python: ModelPython, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``PythonSlicer`` on ``PATH``, running the model's interpreter (Slicer's ``PythonSlicer`` is the application's
    own Python), and ``causalclipseg`` visible to ``find_spec`` in this process as it is in Slicer's once installed
    there (importing it still fails: see :class:`headless_slicer.PackageInOtherInterpreter`)."""
    folder = tmp_path / "slicer_bin"
    folder.mkdir()
    shim = write_script(folder / "PythonSlicer", f'exec "{model_python.executable}" "$@"\n')
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    finder = headless_slicer.PackageInOtherInterpreter("causalclipseg", model_python.package_origin)
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])
    return shim


@pytest.fixture
def launcher(model_python: ModelPython, tmp_path: Path) -> Path:
    """An interpreter path that, like Slicer's ``PythonSlicer`` launcher, starts the model's Python as its child (a
    process tree of two); a new path per test, so that no model process kept from another test serves it."""
    return write_script(tmp_path / "python-launcher", f'"{model_python.executable}" "$@"\nexit $?\n')


# ------------------------------------------------------------------------------------------ the slow services
class ReferenceRun:
    """One ``causalclipseg predict`` run (the model's interpreter, the CPU, the module's prompt and side) over every
    input, started at once and awaited by :meth:`masks`: the PNGs as files, the volumes as Slicer's NRRD writer
    writes them (the colour picture as its channel mean, which is what the module segments)."""

    def __init__(self, model: ModelPython, folder: Path) -> None:
        self.folder = folder
        self.inputs = {"sample_xray": scene.SAMPLE_XRAY,
                       "oblique": scene.save_with_slicer(scene.oblique_array(), scene.oblique_ijk_to_ras(),
                                                         folder / "oblique.nrrd"),
                       "rgb_mean": scene.save_with_slicer(scene.rgb_array().mean(axis=-1, dtype=np.float32),
                                                          scene.PNG_IJK_TO_RAS, folder / "rgb_mean.nrrd")}
        qata = scene.qata_same_lung_image()
        if qata is not None:
            self.inputs["qata"] = qata
        (folder / "prompt.txt").write_text(scene.PROMPT + "\n", encoding="utf-8")
        command = [model.executable, "-m", "causalclipseg.cli", "predict", *map(str, self.inputs.values()),
                   "--prompt-file", str(folder / "prompt.txt"), "--prompt-side", "patient", "--device", "cpu",
                   "--output-dir", str(folder / "out")]
        self.log = folder / "predict.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                                            start_new_session=True)
        self._masks: dict[str, Path] | None = None

    def masks(self) -> dict[str, Path]:
        """The mask file of each input, once the run has ended (waited for on the first call).

        Raises:
            AssertionError: if the command failed or did not write one mask per input.
        """
        if self._masks is None:
            try:
                code = self.process.wait(timeout=scene.MODEL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise
            assert code == 0, f"causalclipseg predict failed:\n{self.log.read_text(errors='replace')[-3000:]}"
            self._masks = {}
            for name, path in self.inputs.items():
                found = sorted((self.folder / "out").glob(f"{path.name.split('.')[0]}_mask.*"))
                assert len(found) == 1, f"not one mask for {path.name}: {sorted(p.name for p in found)}"
                self._masks[name] = found[0]
        return self._masks

    def stop(self) -> None:
        """End the run if no test waited for it (its process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)

    def mask_on(self, name: str, volume: slicer.vtkMRMLVolumeNode) -> np.ndarray:
        """The mask of input ``name`` as a 0/1 (K, J, I) array on ``volume``'s grid: a PNG mask as stored; a NIfTI
        mask loaded with Slicer's own reader, whose grid must be the volume's."""
        path = self.masks()[name]
        if path.suffix == ".png":
            return (scene.read_picture(path) > 0).astype(np.uint8)[None]
        node = slicer.util.loadLabelVolume(str(path))
        try:
            scene.assert_same_geometry(scene.ijk_to_ras(node), scene.ijk_to_ras(volume), 1e-5)  # NIfTI: float32
            return (slicer.util.arrayFromVolume(node) > 0).astype(np.uint8)
        finally:
            slicer.mrmlScene.RemoveNode(node)


class MonaiLabelServer:
    """``python -m monailabel.main start_server --app monailabel_app`` (as its README starts it) with the model's
    interpreter, on a free loopback port, in its own process group with its own temporary, studies and model folders
    (so no fine-tuned weights of another run are served): the bundle's weights, which are the package's."""

    START_TIMEOUT = 240.0  # seconds for /info/ to answer (imports; about 15 s on a free CPU)

    def __init__(self, model: ModelPython, root: Path) -> None:
        for folder in ("studies", "tmp", "model"):
            (root / folder).mkdir()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [model.executable, "-m", "monailabel.main", "start_server",
                   "--app", str(scene.REPO / "monailabel_app"), "--studies", str(root / "studies"),
                   "--host", "127.0.0.1", "--port", str(port), "--conf", "model_dir", str(root / "model")]
        env = {**os.environ, "MONAILABEL_PYEXE": model.executable, "TMPDIR": str(root / "tmp"),
               "PATH": f"{Path(model.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONWARNINGS": "ignore"}
        self.log = root / "server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.ready = False

    def wait_ready(self) -> str:
        """The URL, once ``/info/`` answers (asked with the module's own client).

        Raises:
            AssertionError: if the server exits or does not answer in time (with the end of its log).
        """
        from TextPromptSegmentationLib import monailabel_client

        deadline = time.monotonic() + self.START_TIMEOUT
        while not self.ready:
            assert self.process.poll() is None, \
                f"the server exited with {self.process.returncode}:\n{self.log.read_text(errors='replace')[-3000:]}"
            try:
                monailabel_client.info(self.url, timeout=5)
                self.ready = True
            except monailabel_client.ServerError:
                assert time.monotonic() < deadline, \
                    f"no answer in {self.START_TIMEOUT} s:\n{self.log.read_text(errors='replace')[-3000:]}"
                time.sleep(0.5)
        return self.url

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 20 s."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)


@pytest.fixture(scope="session", autouse=True)
def _slow_services(request: pytest.FixtureRequest, headless: headless_slicer.HeadlessSlicer, module,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Start at once, in the background, what the selected tests will wait for: the reference ``predict`` run and
    the MONAI Label server, so that their start-up (imports, the model) overlaps the first Logic run's."""
    needed = {name for item in request.session.items for name in item.fixturenames}
    model = find_model_python()
    services: dict = {}
    if isinstance(model, ModelPython):
        if "reference_masks" in needed:
            services["reference"] = ReferenceRun(model, tmp_path_factory.mktemp("reference"))
        if "monailabel_server" in needed and model.has("monailabel"):
            services["server"] = MonaiLabelServer(model, tmp_path_factory.mktemp("monailabel"))
    yield services
    for service in services.values():
        service.stop()


@pytest.fixture(scope="session")
def reference_masks(model_python: ModelPython, _slow_services: dict) -> ReferenceRun:
    """``causalclipseg predict``'s masks of every input (see :class:`ReferenceRun`); ask for them after the Logic run,
    which they overlap."""
    return _slow_services["reference"]


@pytest.fixture(scope="session")
def monailabel_server(model_python: ModelPython, _slow_services: dict) -> str:
    """The URL of a MONAI Label server running the repository's app (see :class:`MonaiLabelServer`); skips when
    the model's environment has no ``monailabel``."""
    if "server" not in _slow_services:
        pytest.skip(f"MONAI Label is not installed in {model_python.executable}: pip install -e '.[monailabel]'")
    return _slow_services["server"].wait_ready()
