"""The module's Logic on real volume and segmentation nodes, with the real model run by the project's interpreter.

Every segment is compared with ``causalclipseg predict``'s mask for the same input (:func:`conftest.reference_masks`):
the same voxels, on the input's own grid. Sides are checked on physical coordinates: in RAS, x grows towards the
patient's right, so the patient's left lung has the smaller x, and is on the screen's right in Slicer's axial view.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed here: see tests/slicer_scene/run.sh")

import headless_slicer  # noqa: E402
import scene  # noqa: E402
from scene import MODEL_TIMEOUT  # noqa: E402


@pytest.fixture
def logic(module, model_python):
    """A Logic that runs the model with the project's interpreter, logging into ``logic.lines``."""
    instance = module.TextPromptSegmentationLogic()
    instance.pythonExecutable = model_python.executable
    instance.lines = []
    instance.logCallback = instance.lines.append
    return instance


def segment(logic, volume, segmentation=None, **options) -> tuple[slicer.vtkMRMLSegmentationNode, str]:
    """``Logic.process`` into ``segmentation`` (a new node by default); returns the node and the segment's id."""
    if segmentation is None:
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    name = logic.process(volume, segmentation, scene.request(**options), timeout=MODEL_TIMEOUT)
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
    assert segment_id, f"no segment named {name!r}"
    return segmentation, segment_id


def assert_on_the_patients_left(volume, segmentation, segment_id: str) -> None:
    """Nearly all of the segment lies on the patient's left of the picture's centre: RAS x below the centre's, which
    is the screen's right in Slicer's default axial view."""
    points = scene.segment_points_ras(segmentation, segment_id)
    dims = np.array(volume.GetImageData().GetDimensions())
    centre = (scene.ijk_to_ras(volume) @ np.append((dims - 1) / 2.0, 1.0))[:3]
    patients_left = points[:, 0] < centre[0]
    screen_right = (points - centre) @ scene.axial_screen_right() > 0
    assert np.array_equal(patients_left, screen_right)
    assert patients_left.mean() >= 0.9, f"only {patients_left.mean():.0%} of the segment is on the patient's left"


# ------------------------------------------------------------------------------------------ the module itself
def test_module_imports_unchanged_and_qt_stays_out_of_reach(module) -> None:
    """The module file from ``slicer_extension/`` (not a copy) describes itself; its Widget and any use of ``qt``
    fail loudly here, so the Logic tests below prove the Logic needs neither."""
    parent = types.SimpleNamespace(path=str(scene.MODULE_FILE))
    module.TextPromptSegmentation(parent)
    assert parent.title == "Text Prompt Segmentation" and parent.categories == ["Segmentation"]
    assert "TextPromptSegmentation" in slicer.selfTests
    with pytest.raises(headless_slicer.HeadlessQtError):
        module.TextPromptSegmentationWidget()
    with pytest.raises(headless_slicer.HeadlessQtError):
        sys.modules["qt"].QTimer()
    with pytest.raises(headless_slicer.HeadlessQtError):
        slicer.app.layoutManager()


# ------------------------------------------------------------------------------------------ segmentations
def test_oblique_volume(logic, reference_masks) -> None:
    """A 3-slice CT-like volume on an oblique, anisotropic grid with a far origin."""
    volume = slicer.util.addVolumeFromArray(scene.oblique_array(), ijkToRAS=scene.oblique_ijk_to_ras(), name="oblique")
    segmentation, segment_id = segment(logic, volume)
    scene.assert_segment_is_the_reference(volume, segmentation, segment_id, reference_masks.mask_on("oblique", volume))


def test_xray_picture_on_the_patients_left_and_a_rerun_replaces_it(logic, reference_masks) -> None:
    """A chest X-ray as Slicer loads a PNG (one slice, IJK-to-RAS diag(-1, -1, 1)): the segment is ``predict``'s mask
    of the PNG itself, on the patient's left as the prompt says; the same prompt again replaces the segment."""
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    assert volume.GetClassName() == "vtkMRMLScalarVolumeNode"
    segmentation, segment_id = segment(logic, volume)
    reference = reference_masks.mask_on("sample_xray", volume)
    scene.assert_segment_is_the_reference(volume, segmentation, segment_id, reference)
    assert_on_the_patients_left(volume, segmentation, segment_id)

    slicer.util.updateSegmentBinaryLabelmapFromArray(np.ones_like(reference), segmentation, segment_id, volume)
    assert slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).all()  # edited by hand
    again_segmentation, again_id = segment(logic, volume, segmentation)
    assert again_segmentation.GetSegmentation().GetNumberOfSegments() == 1 and again_id == segment_id
    scene.assert_segment_is_the_reference(volume, segmentation, segment_id, reference)


def test_rgb_vector_volume(logic, reference_masks) -> None:
    """A colour picture as Slicer loads an RGB PNG (a vector volume): segmented as its channel mean, on its grid."""
    volume = slicer.util.addVolumeFromArray(scene.rgb_array(), ijkToRAS=scene.PNG_IJK_TO_RAS, name="rgb",
                                            nodeClassName="vtkMRMLVectorVolumeNode")
    assert slicer.util.arrayFromVolume(volume).shape == (1, 224, 224, 3)
    segmentation, segment_id = segment(logic, volume)
    scene.assert_segment_is_the_reference(volume, segmentation, segment_id, reference_masks.mask_on("rgb_mean", volume))
    assert_on_the_patients_left(volume, segmentation, segment_id)


def test_qata_validation_xray_left_means_the_patients_left(logic, reference_masks) -> None:
    """A QaTa-COV19 validation X-ray whose caption names the viewer's right (the patient's left), loaded as Slicer
    loads the PNG: the module's prompt naming the patient's left gives ``predict``'s mask of the PNG, on the
    patient's left (the screen's right)."""
    image = scene.qata_same_lung_image()
    if image is None:
        pytest.skip(f"QaTa-COV19 not found at {scene.QATA_ROOT} (the shared data beside the repository)")
    volume = scene.add_png_volume(image)
    segmentation, segment_id = segment(logic, volume)
    scene.assert_segment_is_the_reference(volume, segmentation, segment_id, reference_masks.mask_on("qata", volume))
    assert_on_the_patients_left(volume, segmentation, segment_id)


# ------------------------------------------------------------------------------------------ errors and cancel
def test_model_error_is_one_readable_line_and_the_job_is_kept(logic) -> None:
    """A prompt the module accepts but the package refuses (no word in it): the package's own one-line error, and
    the job folder kept to repeat by hand. Answered by the model process already loaded (no new start)."""
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(Exception) as error:  # noqa: B017 - which class is the runner's choice; the message is checked
        logic.process(volume, segmentation, scene.request(prompt="???"), timeout=MODEL_TIMEOUT)
    scene.assert_one_readable_line(error.value, "prompt must contain a word", "'???'")
    kept = [line for line in logic.lines if "job folder is kept" in line]
    assert kept and Path(kept[-1].split(": ", 1)[1]).is_dir(), logic.lines
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_missing_interpreter_is_one_readable_line(logic) -> None:
    """An interpreter path (Advanced > Python interpreter) that does not exist: said before anything starts."""
    logic.pythonExecutable = "/no/such/python3"
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    with pytest.raises(FileNotFoundError) as error:
        segment(logic, volume)
    scene.assert_one_readable_line(error.value, "/no/such/python3")


def test_interpreter_without_the_package_is_one_readable_line(logic, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Slicer's own Python (this one) has no ``causalclipseg``: the child's own complaint reaches the user."""
    monkeypatch.chdir(tmp_path)  # not the repository: its causalclipseg/ folder would be found from there
    logic.pythonExecutable = sys.executable
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    with pytest.raises(Exception) as error:  # noqa: B017 - which class is the runner's choice; the message is checked
        segment(logic, volume)
    scene.assert_one_readable_line(error.value, "No module named", "causalclipseg")


def _explanations(logic, volume, kinds: tuple[str, ...], **options) -> dict[tuple[str, str], np.ndarray]:
    """With ``explain``, for two prompts: one float volume per kind of ``kinds`` (and none of the other kinds) on
    the input's grid, named after the prompt, displayed as the Lib's styles say; the probability thresholded is the
    segment. The maps by (prompt, kind)."""
    from TextPromptSegmentationLib import explanations
    maps = {}
    bilateral = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."
    for prompt in (scene.PROMPT, bilateral):
        segmentation, segment_id = segment(logic, volume, prompt=prompt, explain=True, **options)
        nodes = {kind: slicer.mrmlScene.GetFirstNodeByName(explanations.explanation_name(prompt, kind))
                 for kind in kinds}
        assert not any(slicer.mrmlScene.GetFirstNodeByName(explanations.explanation_name(prompt, kind))
                       for kind in explanations.STYLES if kind not in kinds)
        assert [node.GetName() for node in logic.explanationVolumes] == [nodes[kind].GetName() for kind in nodes]
        for kind, node in nodes.items():
            values = slicer.util.arrayFromVolume(node)
            assert values.dtype == np.float32 and values.shape == slicer.util.arrayFromVolume(volume).shape
            np.testing.assert_allclose(scene.ijk_to_ras(node), scene.ijk_to_ras(volume), atol=1e-9)
            assert 0.0 <= values.min() and values.max() <= 1.0
            display = node.GetDisplayNode()
            assert display.GetColorNodeID() == explanations.STYLES[kind].color_node_id
            low, high = explanations.STYLES[kind].window_for(values)
            assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((low, high), abs=1e-4)
            maps[prompt, kind] = values
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        np.testing.assert_array_equal(mask > 0, maps[prompt, "probability"] > scene.request().threshold)
    return maps


def test_explanations_are_volumes_on_the_input_grid_styled_and_follow_the_prompt(logic) -> None:
    """The shipped model has no causal module: its explanation is the probability alone, and another prompt gives
    another probability."""
    maps = _explanations(logic, scene.add_png_volume(scene.SAMPLE_XRAY), ("probability",))
    first, second = (prompt for prompt, _ in maps)
    assert np.abs(maps[first, "probability"] - maps[second, "probability"]).max() > 0.05


def test_a_causal_models_explanations_add_its_causal_mask(logic, model_python, tmp_path: Path) -> None:
    """A model with a causal module (random ``tiny`` weights, made by the project's interpreter): the probability and
    the causal mask, which is the same for both prompts (the mask generators see the image before the text) and not
    flat (its own range is its window: ``_explanations`` checks the display)."""
    import subprocess

    checkpoint = tmp_path / "tiny.pt"
    subprocess.run([model_python.executable, "-c", "import sys, torch, causalclipseg; torch.manual_seed(0); "
                    "torch.save(causalclipseg.create_model('tiny').state_dict(), sys.argv[1])", str(checkpoint)],
                   check=True, timeout=MODEL_TIMEOUT)
    maps = _explanations(logic, scene.add_png_volume(scene.SAMPLE_XRAY), ("probability", "causal mask"),
                         model="tiny", checkpoint=str(checkpoint))
    first, second = (prompt for prompt, kind in maps if kind == "causal mask")
    np.testing.assert_allclose(maps[first, "causal mask"], maps[second, "causal mask"], atol=1e-6)
    causal = maps[first, "causal mask"]  # random mask generators start near 0.5: a narrow range, its own window
    assert causal.max() - causal.min() > 1e-4, "the causal mask is flat"


def test_a_causalclipseg_folder_in_slicers_working_folder_is_not_run(logic, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Slicer may be started anywhere, e.g. in a source checkout: the model process must run the interpreter's
    package, not a ``causalclipseg/`` folder in Slicer's working folder (``python -m`` looks there first)."""
    stray = tmp_path / "causalclipseg"
    stray.mkdir()
    (stray / "__init__.py").write_text("")
    (stray / "cli.py").write_text("import sys\nsys.exit('error: ran the causalclipseg folder in the working folder')\n")
    monkeypatch.chdir(tmp_path)
    logic.pythonExecutable = sys.executable  # has no causalclipseg of its own
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    with pytest.raises(Exception) as error:  # noqa: B017 - the message is what the user gets
        segment(logic, volume)
    scene.assert_one_readable_line(error.value, "No module named", "causalclipseg")


def new_descendants(before: dict) -> dict:
    """The processes started since ``before``: new descendants of this process."""
    return {pid: info for pid, info in scene.descendants().items() if pid not in before}


def test_cancel_ends_the_whole_process_tree(logic, launcher: Path, model_python) -> None:
    """Cancel as the panel's button does (``start``, ``poll``, ``cancel``) while the model loads in a launcher's child:
    no process of the run is left, the run reads as cancelled, and reading its result says there is none."""
    requires_proc()
    from TextPromptSegmentationLib.runner import RunState

    logic.pythonExecutable = str(launcher)
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    before = scene.descendants()
    logic.start(volume, scene.request())
    tree: dict = {}

    def model_started() -> bool:
        tree.update(new_descendants(before))
        return any(info.command.startswith(model_python.executable) for info in tree.values())

    assert scene.wait_until(model_started, 60), f"the model's process did not start: {tree}"
    assert logic.running and logic.poll().state is RunState.RUNNING
    logic.cancel()
    assert scene.wait_until(lambda: logic.poll().state.done, 30)
    assert logic.poll().state is RunState.CANCELLED and not logic.running
    assert_gone(tree)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError) as error:  # a script that reads the result anyway
        logic.finish(segmentation)
    scene.assert_one_readable_line(error.value, "no finished segmentation")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_timeout_cancels_the_run_and_says_so_in_one_line(logic, launcher: Path) -> None:
    """``process`` (scripts) cancels a run that outlasts its timeout: one readable line, and no process of the run
    (the launcher and its child) is left."""
    requires_proc()
    logic.pythonExecutable = str(launcher)
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    before = scene.descendants()
    tree: dict = {}
    stop = threading.Event()

    def watch() -> None:  # the run's processes, seen while process() blocks
        while not stop.is_set():
            tree.update(new_descendants(before))
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(TimeoutError) as error:
            logic.process(volume, segmentation, scene.request(), timeout=3.0)
    finally:
        stop.set()
        watcher.join()
    scene.assert_one_readable_line(error.value, "3.0 s")
    assert any(info.ppid in tree for info in tree.values()), f"the launcher's child was not seen: {tree}"
    assert_gone(tree)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def assert_gone(tree: dict) -> None:
    """No process of ``tree`` is alive, and none is left in its process groups."""
    groups = {info.pgid for info in tree.values()}
    assert tree and scene.wait_until(
        lambda: not any(pid in scene.live_processes() for pid in tree)
        and not any(info.pgid in groups for info in scene.live_processes().values()), 15), \
        f"left running: {[info for info in scene.live_processes().values() if info.pgid in groups or info.pid in tree]}"


def requires_proc() -> None:
    if not Path("/proc/self/stat").is_file():
        pytest.skip("process trees are read from /proc (Linux)")


# ------------------------------------------------------------------------------------------ the module's own test
def test_module_self_test_passes_headless(module, pythonslicer_on_path: Path) -> None:
    """*Reload and Test*: the module's ``TextPromptSegmentationTest`` runs through ``slicer.selfTests`` with its own
    Logic (no interpreter set: ``PythonSlicer``) and passes both of its tests, without skipping."""
    headless_slicer.DISPLAYED.clear()
    module.TextPromptSegmentation(types.SimpleNamespace(path=str(scene.MODULE_FILE)))
    slicer.selfTests["TextPromptSegmentation"]()
    shown = list(headless_slicer.DISPLAYED)
    assert not [m for m in shown if m.startswith("Skipped")], shown
    assert "3-D oblique volume passed" in shown and "Single-slice volume passed" in shown, shown
    assert any(str(pythonslicer_on_path) in m for m in shown), "the test's Logic did not run PythonSlicer"


def run_self_test(module, python: str | None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The module's own test through ``slicer.selfTests`` with ``python`` saved under Advanced (``Python``, as the
    widget saves it); what it displayed."""
    monkeypatch.setitem(headless_slicer.SETTINGS, "TextPromptSegmentation/Python", python or "")
    headless_slicer.DISPLAYED.clear()
    module.TextPromptSegmentation(types.SimpleNamespace(path=str(scene.MODULE_FILE)))
    slicer.selfTests["TextPromptSegmentation"]()
    return list(headless_slicer.DISPLAYED)


def test_module_self_test_runs_the_interpreter_set_under_advanced(module, launcher: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Slicer's own Python lacks the package here (no ``PythonSlicer``, nothing for ``find_spec``), as for a user who
    set an interpreter under Advanced instead of installing into Slicer: the test runs with that interpreter and
    passes, without skipping."""
    assert importlib.util.find_spec("causalclipseg") is None
    shown = run_self_test(module, str(launcher), monkeypatch)
    assert not [m for m in shown if m.startswith("Skipped")], shown
    assert f"Running the package with {launcher}" in shown, shown
    assert "3-D oblique volume passed" in shown and "Single-slice volume passed" in shown, shown


def test_module_self_test_skips_naming_the_interpreter_that_cannot_run_it(module, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter set under Advanced without the package, one that is missing, one that cannot start: the test
    skips with one line naming it and why (no model run)."""
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'cannot start: libpython missing' >&2\nexit 3\n")
    broken.chmod(0o755)
    cases = ((sys.executable, "not installed for the Python interpreter"), (str(tmp_path / "absent"), "does not exist"),
             (str(broken), "libpython missing"))
    for python, words in cases:
        shown = run_self_test(module, python, monkeypatch)
        assert len(shown) == 1 and shown[0].startswith("Skipped: ") and python in shown[0] and words in shown[0], \
            (python, shown)
        assert "\n" not in shown[0]


def test_slicers_process_never_imported_the_model() -> None:
    """The module runs the model out of process only: after all of the above, neither torch nor the package was ever
    imported into Slicer's process."""
    assert "torch" not in sys.modules and "causalclipseg" not in sys.modules
