"""The 3D Slicer extension without Slicer: its Slicer-free Lib, and static checks of the files Slicer reads.

Slicer cannot run here, so the module file is compiled and cross-checked against its ``.ui`` and CMake lists;
the ``TextPromptSegmentationTest`` class inside it covers the rest for users who have Slicer.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

EXTENSION = Path(__file__).resolve().parents[1] / "slicer_extension"
MODULE_DIR = EXTENSION / "TextPromptSegmentation"
MODULE_FILE = MODULE_DIR / "TextPromptSegmentation.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "TextPromptSegmentation.ui"
LIB = MODULE_DIR / "TextPromptSegmentationLib"
sys.path.insert(0, str(MODULE_DIR))

from TextPromptSegmentationLib import dependencies, explanations, monailabel_client, segments, volume_io  # noqa: E402
from TextPromptSegmentationLib.request import (  # noqa: E402
    EXAMPLE_PROMPTS,
    PROMPT_SIDES,
    SegmentationRequest,
    build_predict_command,
    child_environment,
    load_request,
    prepare_job,
)
from TextPromptSegmentationLib.runner import (  # noqa: E402
    BackgroundCall,
    ProcessFailedError,
    ProcessRunner,
    RunState,
    parse_progress,
)
from TextPromptSegmentationLib.worker import (  # noqa: E402
    ModelWorker,
    build_worker_command,
    parse_answer,
    shared_worker,
    stop_shared_worker,
)

PROMPT = "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."


def oblique_matrix(spacing: tuple[float, float, float] = (0.7, 0.9, 2.5),
                   origin: tuple[float, float, float] = (-120.25, 33.5, 417.75)) -> np.ndarray:
    """IJK-to-RAS with a rotation about two axes, anisotropic spacing and a far origin."""
    a, b = np.deg2rad(25.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ rx @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


# --- static checks of the extension --------------------------------------------------------------------------


def _cmake_list(text: str, variable: str) -> list[str]:
    body = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert body, f"{variable} not set"
    return body.group(1).split()


def test_top_level_cmake_follows_the_extension_template() -> None:
    text = (EXTENSION / "CMakeLists.txt").read_text()
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf"^set\(EXTENSION_{field} ", text, re.M), f"EXTENSION_{field} missing"
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(TextPromptSegmentation)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


def test_module_cmake_lists_every_python_file_and_resource() -> None:
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text
    listed = {s.replace("${MODULE_NAME}", "TextPromptSegmentation") for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    shipped = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")}
    assert listed == shipped, f"unlisted: {shipped - listed}, listed but missing: {listed - shipped}"
    for resource in _cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "TextPromptSegmentation")).is_file(), resource
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").is_file()
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_icon_is_a_128_px_png() -> None:
    data = (MODULE_DIR / "Resources" / "Icons" / "TextPromptSegmentation.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == int.from_bytes(data[20:24], "big") == 128


def test_module_file_compiles_and_has_the_four_classes(tmp_path: Path) -> None:
    import py_compile

    py_compile.compile(str(MODULE_FILE), cfile=str(tmp_path / "module.pyc"), doraise=True)
    classes = {node.name for node in ast.parse(MODULE_FILE.read_text()).body if isinstance(node, ast.ClassDef)}
    assert {f"TextPromptSegmentation{suffix}" for suffix in ("", "Widget", "Logic", "Test")} <= classes


def _ui_widgets() -> tuple[ET.Element, dict[str, str]]:
    root = ET.parse(UI_FILE).getroot()
    return root, {w.get("name"): w.get("class") for w in root.iter("widget")}


# The class each widget the module code looks up must have (the code uses that class's API).
EXPECTED_WIDGET_CLASSES = {
    "inputVolumeSelector": "qMRMLNodeComboBox", "outputSegmentationSelector": "qMRMLNodeComboBox",
    "promptTextEdit": "QPlainTextEdit", "examplePromptComboBox": "QComboBox", "promptSideComboBox": "QComboBox",
    "backendComboBox": "QComboBox",
    "serverUrlLineEdit": "QLineEdit", "serverModelLineEdit": "QLineEdit", "deviceComboBox": "QComboBox",
    "thresholdSliderWidget": "ctkSliderWidget", "pythonPathLineEdit": "ctkPathLineEdit",
    "checkpointPathLineEdit": "ctkPathLineEdit", "modelLineEdit": "QLineEdit", "packageLineEdit": "QLineEdit",
    "modelConfigPathLineEdit": "ctkPathLineEdit",
    "installButton": "QPushButton",
    "segmentButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit", "explainCheckBox": "QCheckBox", "flipTtaCheckBox": "QCheckBox",
}


def test_every_widget_the_code_uses_exists_in_the_ui_with_its_class() -> None:
    root, widgets = _ui_widgets()
    assert root.find("widget").get("class") == "qMRMLWidget"
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module code looks up no widget"
    assert used <= set(EXPECTED_WIDGET_CLASSES), f"add the expected class of {used - set(EXPECTED_WIDGET_CLASSES)}"
    for name in used:
        assert name in widgets, f"{name} is used by the code but missing from the .ui"
        assert widgets[name] == EXPECTED_WIDGET_CLASSES[name], f"{name} is a {widgets[name]} in the .ui"


def test_prompt_side_is_offered_remembered_passed_on_and_explained() -> None:
    _, widgets = _ui_widgets()
    assert widgets.get("promptSideComboBox") == "QComboBox"
    code = MODULE_FILE.read_text()
    for use in ("self.ui.promptSideComboBox.addItem(label, side)", 'SETTINGS + "PromptSide"',
                "prompt_side=self.ui.promptSideComboBox.currentData", "request.server_params()"):
        assert use in code, f"the module lacks {use}"
    assert code.count('SETTINGS + "PromptSide"') == 2, "the prompt side is saved and restored"
    help_text = ast.literal_eval(re.search(r"helpText = (\(.*?\))\n", code, re.S).group(1))
    readme = (EXTENSION / "README.md").read_text()
    tips = " ".join(w.findtext("property[@name='toolTip']/string") for w in ET.parse(UI_FILE).getroot().iter("widget")
                    if w.get("name") in ("promptTextEdit", "promptSideComboBox"))
    for text in (help_text, readme, tips):
        assert "patient's sides" in text and "screen's right" in text and "QaTa-COV19" in text


def test_explain_is_offered_remembered_and_passed_on() -> None:
    _, widgets = _ui_widgets()
    assert widgets.get("explainCheckBox") == "QCheckBox"
    code = MODULE_FILE.read_text()
    for use in ("explain=bool(self.ui.explainCheckBox.checked)", "monailabel_client.infer_maps",
                "explanations.read_explanations(mapFiles, shape, matrix", "self.showExplanations()",
                "explanations.style_display(node.GetDisplayNode(), kind, values)", "foregroundOpacity=explanations."):
        assert use in code, f"the module lacks {use}"
    assert code.count('SETTINGS + "Explain"') == 2, "the choice is saved and restored"
    assert "Show explanations" in (EXTENSION / "README.md").read_text()


def test_flip_tta_is_offered_remembered_and_passed_on() -> None:
    _, widgets = _ui_widgets()
    assert widgets.get("flipTtaCheckBox") == "QCheckBox"
    code = MODULE_FILE.read_text()
    assert "flip_tta=bool(self.ui.flipTtaCheckBox.checked)" in code
    assert code.count('SETTINGS + "FlipTta"') == 2, "the choice is saved and restored"
    assert "Flip test-time augmentation" in (EXTENSION / "README.md").read_text()


def test_model_is_offered_remembered_and_passed_on_to_the_local_backend() -> None:
    """*Advanced → Model*: the variant a checkpoint belongs to (``tiny`` for a causal mask); empty: the shipped one.
    *Advanced → Model config*: the config file of a variant of one's own."""
    code = MODULE_FILE.read_text()
    for use in ("model=self.ui.modelLineEdit.text.strip() or None",
                "self.ui.modelLineEdit.enabled = not remote and not running",
                "model_config=self.ui.modelConfigPathLineEdit.currentPath.strip() or None",
                "self.ui.modelConfigPathLineEdit.enabled = not remote and not running"):
        assert use in code, f"the module lacks {use}"
    assert code.count('SETTINGS + "Model"') == 2, "the choice is saved and restored"
    assert code.count('SETTINGS + "ModelConfig"') == 2, "the choice is saved and restored"
    readme = (EXTENSION / "README.md").read_text()
    assert "*Advanced → Model*" in readme and "*Advanced → Model config*" in readme


def test_ui_declares_its_custom_widgets_and_connects_the_scene() -> None:
    root, widgets = _ui_widgets()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {cls for cls in widgets.values() if not cls.startswith("Q")}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"
    combos = [name for name, cls in widgets.items() if cls == "qMRMLNodeComboBox"]
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot").startswith("setMRMLScene")}
    assert set(combos) <= receivers, "every node selector needs the scene"
    for widget in root.iter("widget"):
        if widget.get("class") == "qMRMLNodeComboBox":
            types = widget.find("property[@name='nodeTypes']/stringlist")
            assert types is not None and [s.text for s in types], f"{widget.get('name')} has no nodeTypes"


def test_lib_imports_neither_slicer_nor_torch() -> None:
    forbidden = {"slicer", "qt", "vtk", "ctk", "torch", "monai"}
    for path in LIB.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"
    code = ("import sys, TextPromptSegmentationLib.request, TextPromptSegmentationLib.runner, "
            "TextPromptSegmentationLib.monailabel_client, TextPromptSegmentationLib.dependencies, "
            "TextPromptSegmentationLib.worker, TextPromptSegmentationLib.explanations; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=MODULE_DIR, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# --- geometry round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("shape", [(5, 12, 9), (1, 16, 11)], ids=["3d", "2d"])
def test_volume_round_trip_keeps_oblique_geometry(tmp_path: Path, suffix: str, shape: tuple[int, int, int]) -> None:
    array = np.random.default_rng(0).integers(-1000, 2000, shape).astype(np.int16)
    matrix = oblique_matrix()
    path = volume_io.write_volume(tmp_path / f"vol{suffix}", array, matrix)
    back, back_matrix = volume_io.read_volume(path)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.int16
    assert volume_io.same_grid(back.shape, back_matrix, shape, matrix)
    np.testing.assert_allclose(back_matrix, matrix, rtol=1e-6, atol=1e-5)


def test_files_carry_the_geometry_in_each_format_convention(tmp_path: Path) -> None:
    array, matrix = np.zeros((3, 4, 5), np.uint8), oblique_matrix()
    nifti = nib.load(str(volume_io.write_volume(tmp_path / "v.nii.gz", array, matrix)))
    assert nifti.shape == (5, 4, 3)  # IJK
    np.testing.assert_allclose(nifti.affine, matrix, atol=1e-4)
    assert int(nifti.header["sform_code"]) == 1
    data, header = nrrd.read(str(volume_io.write_volume(tmp_path / "v.nrrd", array, matrix)), index_order="F")
    assert data.shape == (5, 4, 3) and header["space"] == "left-posterior-superior"
    lps = np.diag([-1, -1, 1]) @ matrix[:3, :3]
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps)
    np.testing.assert_allclose(header["space origin"], np.diag([-1, -1, 1]) @ matrix[:3, 3])


def test_ras_nrrd_and_2d_files_are_read(tmp_path: Path) -> None:
    header = {"space": "right-anterior-superior", "space directions": np.array([[0.5, 0, 0], [0, 0.25, 0]]),
              "space origin": np.array([1.0, 2.0, 3.0]), "kinds": ["domain", "domain"]}
    nrrd.write(str(tmp_path / "ras2d.nrrd"), np.ones((6, 4), np.uint8), header, index_order="F")
    array, matrix = volume_io.read_volume(tmp_path / "ras2d.nrrd")
    assert array.shape == (1, 4, 6)
    np.testing.assert_allclose(matrix, [[0.5, 0, 0, 1], [0, 0.25, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ones((6, 4), np.uint8), np.diag([2.0, 3.0, 1.0, 1.0])), str(tmp_path / "flat.nii"))
    assert volume_io.read_volume(tmp_path / "flat.nii")[0].shape == (1, 4, 6)


def test_result_on_another_grid_is_refused_or_resampled(tmp_path: Path) -> None:
    shape, matrix = (4, 6, 5), oblique_matrix()
    mask = np.zeros(shape, np.uint8)
    mask[1:3, 2:5, 1:4] = 1
    # The same voxels stored with the i axis reversed: another grid, same physical positions.
    flipped = matrix.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 3] = matrix[:3, :3] @ [shape[2] - 1, 0, 0] + matrix[:3, 3]
    path = volume_io.write_volume(tmp_path / "flipped.nii.gz", mask[:, :, ::-1], flipped)
    with pytest.raises(volume_io.GridMismatchError, match="not on the input's grid"):
        volume_io.read_on_grid(path, shape, matrix)
    np.testing.assert_array_equal(volume_io.read_on_grid(path, shape, matrix, allow_resample=True), mask)
    nearly = volume_io.write_volume(tmp_path / "nearly.nrrd", mask, matrix + 1e-7)  # rounding: the same grid
    np.testing.assert_array_equal(volume_io.read_on_grid(nearly, shape, matrix), mask)
    with pytest.raises(volume_io.GridMismatchError, match=r"shape \(4, 6, 4\) vs \(4, 6, 5\)"):
        volume_io.read_on_grid(volume_io.write_volume(tmp_path / "small.nii", mask[..., :4], matrix), shape, matrix)


def test_volume_io_rejects_what_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="singular"):
        volume_io.write_volume(tmp_path / "a.nii", np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\.nii, \.nii\.gz or \.nrrd"):
        volume_io.write_volume(tmp_path / "a.png", np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(FileNotFoundError):
        volume_io.read_volume(tmp_path / "missing.nrrd")
    rgb = np.stack([np.full((1, 3, 4), v, np.uint8) for v in (30, 60, 90)], axis=-1)  # (K, J, I, C) picture
    np.testing.assert_allclose(volume_io.to_scalar(rgb), np.full((1, 3, 4), 60.0))


# --- segment naming and colours ------------------------------------------------------------------------------


def test_segment_name_is_short_single_line_and_readable() -> None:
    assert segments.segment_name("  lesion in the\nleft lung.  ") == "lesion in the left lung"
    name = segments.segment_name(PROMPT)
    assert len(name) <= segments.MAX_NAME_LENGTH and "\n" not in name and name.endswith("\u2026")
    assert PROMPT.startswith(name[:-1].rstrip(","))
    assert segments.segment_name("x" * 100, max_length=20) == "x" * 19 + "\u2026"
    with pytest.raises(ValueError, match="prompt is empty"):
        segments.segment_name(" \n ")


def test_segment_colour_is_stable_per_prompt() -> None:
    colour = segments.segment_color(PROMPT)
    assert colour in segments.PALETTE
    assert segments.segment_color("  " + PROMPT.upper().replace(" ", "  ")) == colour
    # Fixed by SHA-256, not by Python's per-process hash(): the same in another interpreter.
    code = f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r}); from TextPromptSegmentationLib import segments; " \
           f"print(segments.PALETTE.index(segments.segment_color({PROMPT!r})))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert int(other.stdout) == segments.PALETTE.index(colour)
    assert len({segments.segment_color(p) for p in EXAMPLE_PROMPTS + ("tumour", "nodule", "effusion")}) > 2


# --- request and dependencies --------------------------------------------------------------------------------


def test_request_validates_with_messages_that_teach() -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        SegmentationRequest("   ")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        SegmentationRequest("x", device="gpu")
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        SegmentationRequest("x", threshold=1.0)
    assert SegmentationRequest("x", device="cuda:1", checkpoint=" ").checkpoint is None
    assert SegmentationRequest("x").prompt_side == "patient" and SegmentationRequest("x", prompt_side="viewer")
    with pytest.raises(ValueError, match="^prompt_side must be patient or viewer .*, got 'Patient'$"):
        SegmentationRequest("x", prompt_side="Patient")


def test_prompt_sides_are_the_packages() -> None:
    from causalclipseg.data.prompts import PROMPT_SIDES as package_sides

    assert PROMPT_SIDES == package_sides


def test_job_folder_and_predict_command(tmp_path: Path) -> None:
    prompt = 'left, right; "quoted" lesion'  # commas and quotes travel in a file, never on a command line
    request = SegmentationRequest(prompt, device="cpu", threshold=0.3, checkpoint="/w/model.pt")
    job = prepare_job(tmp_path / "job", request, np.zeros((2, 3, 4), np.int16), oblique_matrix())
    record = json.loads(job.request_file.read_text())
    assert record["prompt"] == prompt and record["device"] == "cpu" and record["threshold"] == 0.3
    assert record["prompt_side"] == "patient"
    assert record["input"] == str(job.input_file) and job.input_file.is_file()
    assert Path(record["prompt_file"]).read_text().strip() == prompt
    command = build_predict_command("/opt/python", job.request_file)
    assert command[:5] == ["/opt/python", "-m", "causalclipseg.cli", "predict", str(job.input_file)]
    options = dict(zip(command[5::2], command[6::2], strict=False))
    assert options["--prompt-file"] == record["prompt_file"] and options["--output-dir"] == str(job.output_dir)
    assert options["--device"] == "cpu" and float(options["--threshold"]) == 0.3
    assert options["--prompt-side"] == "patient"
    assert "--overwrite" in command and command[-2:] == ["--checkpoint", "/w/model.pt"]
    assert prompt not in command
    assert job.mask_file == job.output_dir / "input_mask.nii.gz"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks prompt"):
        build_predict_command("python", tmp_path / "bad.json")


def test_model_config_round_trips_into_the_predict_command(tmp_path: Path) -> None:
    """A request's model config file reaches ``predict --model-config``; blank is none, and a request written before
    the field existed runs without it."""
    assert SegmentationRequest("x", model_config="  ").model_config is None
    request = SegmentationRequest("lesion", model="my-variant", model_config="/w/my-variant.json")
    job = prepare_job(tmp_path / "job", request, np.zeros((1, 3, 4), np.int16), np.eye(4))
    assert load_request(job.request_file)["model_config"] == "/w/my-variant.json"
    command = build_predict_command("python", job.request_file)
    assert command[command.index("--model-config") + 1] == "/w/my-variant.json"
    assert command[command.index("--model") + 1] == "my-variant"
    older = json.loads(job.request_file.read_text())
    del older["model_config"]
    job.request_file.write_text(json.dumps(older))
    assert "--model-config" not in build_predict_command("python", job.request_file)


def test_prompt_side_round_trips_and_older_requests_mean_the_patients(tmp_path: Path) -> None:
    job = prepare_job(tmp_path / "job", SegmentationRequest("lesion, lower left lung", prompt_side="viewer"),
                      np.zeros((1, 3, 4), np.int16), np.eye(4))
    assert load_request(job.request_file)["prompt_side"] == "viewer"
    command = build_predict_command("python", job.request_file)
    assert command[command.index("--prompt-side") + 1] == "viewer"
    older = json.loads(job.request_file.read_text())
    del older["prompt_side"]  # written before the option existed
    job.request_file.write_text(json.dumps(older))
    assert load_request(job.request_file)["prompt_side"] == "patient"
    command = build_predict_command("python", job.request_file)
    assert command[command.index("--prompt-side") + 1] == "patient"
    job.request_file.write_text(json.dumps({**older, "prompt_side": "left"}))
    with pytest.raises(ValueError, match="prompt_side must be patient or viewer"):
        build_predict_command("python", job.request_file)


def test_explain_round_trips_into_the_predict_command(tmp_path: Path) -> None:
    job = prepare_job(tmp_path / "job", SegmentationRequest("lesion", explain=True), np.zeros((1, 3, 4), np.int16),
                      np.eye(4))
    assert load_request(job.request_file)["explain"] is True
    assert build_predict_command("python", job.request_file)[-1] == "--explain"
    assert job.explanation_files == {"probability": job.output_dir / "input_probability.nii.gz",
                                     "causal mask": job.output_dir / "input_causal_mask.nii.gz"}
    assert list(job.explanation_files) == list(explanations.STYLES)
    plain = prepare_job(tmp_path / "plain", SegmentationRequest("lesion"), np.zeros((1, 3, 4), np.int16), np.eye(4))
    assert "--explain" not in build_predict_command("python", plain.request_file)
    older = json.loads(job.request_file.read_text())
    del older["explain"]  # written before the option existed
    job.request_file.write_text(json.dumps(older))
    assert load_request(job.request_file)["explain"] is False
    assert "--explain" not in build_predict_command("python", job.request_file)
    job.request_file.write_text(json.dumps({**older, "explain": "yes"}))
    with pytest.raises(ValueError, match="^explain must be true or false, got 'yes'$"):
        build_predict_command("python", job.request_file)
    assert "explain" not in SegmentationRequest("lesion", explain=True).server_params()  # maps: one request each


def test_flip_tta_round_trips_into_the_predict_command_and_the_server_params(tmp_path: Path) -> None:
    job = prepare_job(tmp_path / "job", SegmentationRequest("lesion", flip_tta=True), np.zeros((1, 3, 4), np.int16),
                      np.eye(4))
    assert load_request(job.request_file)["flip_tta"] is True
    assert build_predict_command("python", job.request_file)[-1] == "--flip-tta"
    assert SegmentationRequest("lesion", flip_tta=True).server_params()["flip_tta"] is True
    assert SegmentationRequest("lesion").server_params()["flip_tta"] is False
    older = json.loads(job.request_file.read_text())
    del older["flip_tta"]  # written before the option existed
    job.request_file.write_text(json.dumps(older))
    assert load_request(job.request_file)["flip_tta"] is False
    assert "--flip-tta" not in build_predict_command("python", job.request_file)
    job.request_file.write_text(json.dumps({**older, "flip_tta": 1}))
    with pytest.raises(ValueError, match="^flip_tta must be true or false, got 1$"):
        build_predict_command("python", job.request_file)


def test_explanation_maps_are_read_unthresholded_on_the_input_grid(tmp_path: Path) -> None:
    shape, matrix = (3, 6, 5), oblique_matrix()
    job = prepare_job(tmp_path / "job", SegmentationRequest("lesion, left lung.", explain=True),
                      np.zeros(shape, np.int16), matrix)
    rng = np.random.default_rng(0)
    written = {kind: rng.random(shape).astype(np.float32) for kind in job.explanation_files}
    for kind, path in job.explanation_files.items():
        volume_io.write_volume(path, written[kind], matrix)
    maps = explanations.read_explanations(job.explanation_files, shape, matrix)
    assert list(maps) == ["probability", "causal mask"]
    for kind, values in maps.items():
        assert values.dtype == np.float32 and values.shape == shape
        np.testing.assert_array_equal(values, written[kind])  # every value as written, not a mask
    assert explanations.explanation_name("lesion, left lung.", "causal mask") == "lesion, left lung (causal mask)"
    with pytest.raises(ValueError, match="kind must be one of probability, causal mask, got 'heat'"):
        explanations.explanation_name("lesion", "heat")
    moved = matrix.copy()
    moved[:3, 3] += 1.0
    volume_io.write_volume(job.explanation_files["causal mask"], written["causal mask"], moved)
    with pytest.raises(volume_io.GridMismatchError, match="input_causal_mask.nii.gz is not on the input's grid"):
        explanations.read_explanations(job.explanation_files, shape, matrix)
    job.explanation_files["causal mask"].unlink()  # a model without a causal module writes the probability alone
    assert list(explanations.read_explanations(job.explanation_files, shape, matrix)) == ["probability"]
    job.explanation_files["probability"].unlink()  # every model writes it
    with pytest.raises(FileNotFoundError, match="the probability map was asked for but not written"):
        explanations.read_explanations(job.explanation_files, shape, matrix)
    # Colour tables that Slicer builds in (slicer-core has them too, unlike the file-based Inferno/Viridis).
    assert {kind: style.color_node_id for kind, style in explanations.STYLES.items()} == {
        "probability": "vtkMRMLColorTableNodeIron", "causal mask": "vtkMRMLColorTableNodeOcean"}
    probability, causal = explanations.STYLES["probability"], explanations.STYLES["causal mask"]
    values = np.array([0.42, 0.5, 0.63], dtype=np.float32)
    assert probability.window_for(values) == (0.0, 1.0) and 0.0 < probability.lower_threshold < 0.5
    assert causal.window_for(values) == pytest.approx((0.42, 0.63)) and causal.lower_threshold is None
    low, high = causal.window_for(np.full(3, 0.5, dtype=np.float32))  # a flat map still gets a valid range
    assert low == pytest.approx(0.5) and high > low


def test_worker_command_and_answers() -> None:
    assert build_worker_command("/opt/python", 600) == ["/opt/python", "-m", "causalclipseg.cli", "worker",
                                                        "--idle-timeout", "600"]
    with pytest.raises(ValueError, match="idle_timeout must be positive seconds, got 0"):
        build_worker_command("/opt/python", 0)
    answer = {"request": "/job/request.json", "ok": True, "files": ["/job/output/input_mask.nii.gz"]}
    assert parse_answer(json.dumps(answer) + "\n", Path("/job/request.json")) == answer
    assert parse_answer(json.dumps(answer), "/other/request.json") is None  # another job's answer
    for line in ("loading model 'tiny' ...", "{not json", '{"request": "/job/request.json"}', "[1, 2]"):
        assert parse_answer(line, "/job/request.json") is None
    assert shared_worker() is shared_worker()
    stop_shared_worker()  # nothing started: a no-op
    assert shared_worker().pid is None


def test_child_environment_drops_slicer_python_settings_for_another_interpreter() -> None:
    base = {"PYTHONHOME": "/slicer", "PYTHONPATH": "/slicer/lib", "PATH": "/bin"}
    assert "PYTHONHOME" not in child_environment(base, own_interpreter=False)
    assert child_environment(base, own_interpreter=False)["PATH"] == "/bin"
    assert child_environment(base, own_interpreter=True)["PYTHONHOME"] == "/slicer"


def test_install_pins_what_slicer_ships(tmp_path: Path) -> None:
    versions = {"numpy": "1.26.4", "vtk": "9.3.0"}

    def version_of(name: str) -> str:
        if name not in versions:
            import importlib.metadata

            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    path = dependencies.write_constraints(tmp_path / "c.txt", ("numpy", "vtk", "SimpleITK"), version_of)
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["numpy==1.26.4", "vtk==9.3.0"]
    real = dependencies.write_constraints(tmp_path / "real.txt")
    assert f"numpy=={np.__version__}" in real.read_text()
    args = dependencies.pip_install_arguments(["causalclipseg", "nibabel"], path)
    assert args == ["causalclipseg", "nibabel", "--constraint", str(path)]
    with pytest.raises(ValueError, match="not options"):
        dependencies.pip_install_arguments(["--upgrade", "numpy"], path)
    found = {"nibabel"}
    missing = dependencies.missing_requirements({"nibabel": "nibabel", "nrrd": "pynrrd", "causalclipseg": "/w/pkg"},
                                                find_spec=lambda m: object() if m in found else None)
    assert missing == ["pynrrd", "/w/pkg"]


def test_packages_of_another_interpreter_are_asked_in_its_own_process(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter set under Advanced is asked which modules it lacks, from the temporary folder (a package
    folder in Slicer's working folder does not count); one that cannot answer is one readable line."""
    (tmp_path / "only_here_pkg").mkdir()
    (tmp_path / "only_here_pkg" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    missing = dependencies.missing_in_interpreter(
        sys.executable, {"json": "json", "only_here_pkg": "only-here", "no_such_module_q7": "no-such"})
    assert missing == ["only-here", "no-such"]
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'cannot start: libpython missing' >&2\nexit 3\n")
    broken.chmod(0o755)
    for python, words in ((broken, "libpython missing"), (tmp_path / "absent", "No such file")):
        with pytest.raises(RuntimeError) as error:
            dependencies.missing_in_interpreter(python, {"json": "json"})
        message = str(error.value)
        assert "\n" not in message and str(python) in message and words in message, message


# --- process runner ------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_runner_streams_lines_and_progress() -> None:
    code = ("import sys, time\nprint('loading model')\nfor p in (20, 60, 100):\n"
            "    sys.stderr.write(f'\\rpredict: {p:3d}%|###| {p}/100'); sys.stderr.flush(); time.sleep(0.05)\n"
            "print('done')")
    runner = ProcessRunner([sys.executable, "-c", code])
    runner.start()
    updates = []
    assert runner.wait(timeout=30, on_update=updates.append) is RunState.SUCCEEDED
    lines = [line for u in updates for line in u.lines]
    assert "loading model" in lines and "done" in lines
    assert [parse_progress(line) for line in lines if parse_progress(line) is not None] == [0.2, 0.6, 1.0]
    runner.raise_for_status()


def test_runner_surfaces_the_commands_error_line() -> None:
    code = "import sys; print('predict: 50%|##| 1/2', file=sys.stderr); print('error: prompt is empty', " \
           "file=sys.stderr); sys.exit(2)"
    runner = ProcessRunner([sys.executable, "-c", code])
    runner.start()
    assert runner.wait(timeout=30) is RunState.FAILED
    with pytest.raises(ProcessFailedError, match="^prompt is empty$") as info:
        runner.raise_for_status()
    assert info.value.returncode == 2
    crash = ProcessRunner([sys.executable, "-c", "raise RuntimeError('CUDA out of memory')"])
    crash.start()
    crash.wait(timeout=30)
    with pytest.raises(ProcessFailedError, match="^RuntimeError: CUDA out of memory$"):
        crash.raise_for_status()
    with pytest.raises(FileNotFoundError, match="program not found"):
        ProcessRunner(["/no/such/python"]).start()


def test_cancel_kills_the_whole_process_tree() -> None:
    grandchild_code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    code = ("import subprocess, sys, time\n"
            f"g = subprocess.Popen([sys.executable, '-c', {grandchild_code!r}])\n"
            "print(g.pid, flush=True)\ntime.sleep(120)")
    runner = ProcessRunner([sys.executable, "-c", code])
    runner.start()
    deadline, lines = time.monotonic() + 30, []
    while not lines and time.monotonic() < deadline:
        lines = runner.poll().lines
        time.sleep(0.05)
    child, grandchild = runner.pid, int(lines[0])
    assert _alive(child) and _alive(grandchild)
    runner.cancel(grace=2.0)
    assert runner.wait(timeout=10) is RunState.CANCELLED
    deadline = time.monotonic() + 5
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)
    runner.raise_for_status()  # a cancelled run is not an error


def test_runner_sends_lines_to_a_long_lived_command() -> None:
    echo = "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)"
    runner = ProcessRunner([sys.executable, "-c", echo], stdin_pipe=True)
    with pytest.raises(RuntimeError, match="no stdin pipe"):
        runner.send_line("too early")
    runner.start()
    runner.send_line("/job/request.json")
    seen: list[str] = []
    assert _until_lines(runner, seen, "got /job/request.json")
    assert runner.alive and runner.poll().state is RunState.RUNNING  # waiting for the next line
    with pytest.raises(ValueError, match="line break"):
        runner.send_line("a\nb")
    runner.cancel()
    assert not runner.alive and runner.wait(timeout=10) is RunState.CANCELLED
    with pytest.raises(RuntimeError, match="it has exited"):
        runner.send_line("after the end")
    silent = ProcessRunner([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"])  # no pipe: empty
    silent.start()
    assert silent.wait(timeout=30) is RunState.SUCCEEDED and silent.output == ["''"]


def _until_lines(runner: ProcessRunner, seen: list[str], wanted: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        seen += runner.poll().lines
        time.sleep(0.05)
    return wanted in seen


def test_runner_wait_times_out_and_background_call_reports_outcomes() -> None:
    runner = ProcessRunner([sys.executable, "-c", "import time; time.sleep(30)"])
    runner.start()
    with pytest.raises(TimeoutError, match="still running"):
        runner.wait(timeout=0.2)
    runner.cancel()
    ok = BackgroundCall(lambda x: x * 2, 21)
    ok.start()
    assert ok.wait(timeout=10) is RunState.SUCCEEDED and ok.result() == 42
    bad = BackgroundCall(monailabel_client.normalise_url, "")
    bad.start()
    assert bad.wait(timeout=10) is RunState.FAILED
    with pytest.raises(ValueError, match="URL is empty"):
        bad.result()
    slow = BackgroundCall(time.sleep, 5)
    slow.start()
    slow.cancel()
    assert slow.poll().state is RunState.CANCELLED
    with pytest.raises(RuntimeError, match="cancelled"):
        slow.result()


# --- MONAI Label client against a fake server ---------------------------------------------------------------


class _FakeMonaiLabel(BaseHTTPRequestHandler):
    """/info/ and /infer/<model>; a model name picks a failure."""

    label: bytes = b""
    models: dict = {"causalclipseg": {}}  # what /info/ lists
    received: dict = {}
    sent_params: list = []  # the params of each /infer request, in order

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/info/":
            self._send(200, json.dumps({"name": "fake", "models": self.models}).encode(), "application/json")
        else:
            self._send(200, b"<html>not MONAI Label</html>", "text/html")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        model = self.path.split("/")[2].split("?")[0]
        _FakeMonaiLabel.received = {"path": self.path, "body": body, "type": self.headers["Content-Type"]}
        params = re.search(rb'name="params"\r\n\r\n(.*?)\r\n--', body, re.S)
        _FakeMonaiLabel.sent_params.append(json.loads(params.group(1)) if params else None)
        if model == "causalclipseg":
            self._send(200, self.label, "application/octet-stream",
                       {"Content-Disposition": 'attachment; filename="result.nii.gz"'})
        elif model == "broken":
            self._send(500, json.dumps({"detail": "Failed to execute infer"}).encode(), "application/json")
        elif model == "invalid":
            self._send(422, json.dumps({"detail": [{"loc": ["body"], "msg": "field required"}]}).encode(),
                       "application/json")
        elif model == "jsononly":
            self._send(200, json.dumps({"label_names": {}}).encode(), "application/json")
        elif model == "slow":
            time.sleep(1.5)
            self._send(200, b"late", "application/octet-stream")
        else:
            self._send(404, b"Not Found", "text/plain")


@pytest.fixture
def fake_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeMonaiLabel)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_monailabel_info_and_infer(tmp_path: Path, fake_server: str) -> None:
    assert monailabel_client.available_models(monailabel_client.info(fake_server + "/")) == ["causalclipseg"]
    shape, matrix = (3, 8, 7), oblique_matrix()
    image = volume_io.write_volume(tmp_path / "image.nii.gz", np.ones(shape, np.int16), matrix)
    mask = np.zeros(shape, np.uint8)
    mask[1, 2:5, 3:6] = 1
    _FakeMonaiLabel.label = volume_io.write_volume(tmp_path / "srv.nii.gz", mask, matrix).read_bytes()
    result = monailabel_client.infer(fake_server.removeprefix("http://"), "causalclipseg", image,
                                     {"prompt": PROMPT, "device": "cuda"}, tmp_path / "out", timeout=10)
    assert result.name == "label.nii.gz"
    np.testing.assert_array_equal(volume_io.read_on_grid(result, shape, matrix), mask)
    sent = _FakeMonaiLabel.received
    assert sent["path"] == "/infer/causalclipseg?output=image" and sent["type"].startswith("multipart/form-data")
    assert json.dumps({"prompt": PROMPT, "device": "cuda"}).encode() in sent["body"]
    assert image.read_bytes() in sent["body"] and b'filename="image.nii.gz"' in sent["body"]


def test_monailabel_explanations_are_one_request_each(tmp_path: Path, fake_server: str) -> None:
    """The mask, then each map with its ``result_map`` (MONAI Label answers one file per request), into files of
    their own; without maps, one request."""
    image = volume_io.write_volume(tmp_path / "image.nii.gz", np.ones((1, 4, 4), np.int16), np.eye(4))
    _FakeMonaiLabel.label = volume_io.write_volume(tmp_path / "srv.nii.gz", np.full((1, 4, 4), 0.25, np.float32),
                                                   np.eye(4)).read_bytes()
    _FakeMonaiLabel.sent_params = []
    params = SegmentationRequest(PROMPT, device="cpu").server_params()
    files = monailabel_client.infer_maps(fake_server, "causalclipseg", image, params, tmp_path / "out",
                                         explanations.RESULT_MAPS, timeout=10)
    assert list(files) == ["mask", *explanations.STYLES] and len({path.name for path in files.values()}) == 3
    assert [sent.get("result_map") for sent in _FakeMonaiLabel.sent_params] == [None, "probability", "causal_mask"]
    assert all({k: v for k, v in sent.items() if k != "result_map"} == params for sent in _FakeMonaiLabel.sent_params)
    maps = explanations.read_explanations({k: v for k, v in files.items() if k != "mask"}, (1, 4, 4), np.eye(4))
    assert all(np.allclose(values, 0.25) for values in maps.values())
    _FakeMonaiLabel.sent_params = []
    assert list(monailabel_client.infer_maps(fake_server, "causalclipseg", image, params, tmp_path / "one")) == ["mask"]
    assert len(_FakeMonaiLabel.sent_params) == 1


def test_monailabel_explanations_are_those_the_served_model_gives(tmp_path: Path, fake_server: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose model lists its ``result_map`` choices in ``/info/`` (the app's model without a causal module:
    mask and probability) is asked only for those maps."""
    image = volume_io.write_volume(tmp_path / "image.nii.gz", np.ones((1, 4, 4), np.int16), np.eye(4))
    _FakeMonaiLabel.label = volume_io.write_volume(tmp_path / "srv.nii.gz", np.full((1, 4, 4), 0.25, np.float32),
                                                   np.eye(4)).read_bytes()
    _FakeMonaiLabel.sent_params = []
    monkeypatch.setattr(_FakeMonaiLabel, "models",
                        {"causalclipseg": {"config": {"result_map": ["mask", "probability"]}}})
    info = monailabel_client.info(fake_server)
    assert monailabel_client.served_maps(info, "causalclipseg") == ["mask", "probability"]
    assert monailabel_client.served_maps(info, "other") is None
    params = SegmentationRequest(PROMPT, device="cpu").server_params()
    files = monailabel_client.infer_maps(fake_server, "causalclipseg", image, params, tmp_path / "out",
                                         explanations.RESULT_MAPS, timeout=10)
    assert list(files) == ["mask", "probability"]
    assert [sent.get("result_map") for sent in _FakeMonaiLabel.sent_params] == [None, "probability"]


@pytest.mark.parametrize("side", PROMPT_SIDES)
def test_monailabel_request_sends_the_prompt_side_and_flip_tta(tmp_path: Path, fake_server: str, side: str) -> None:
    image = volume_io.write_volume(tmp_path / "image.nii.gz", np.ones((1, 4, 4), np.int16), np.eye(4))
    _FakeMonaiLabel.label = volume_io.write_volume(tmp_path / "srv.nii.gz", np.zeros((1, 4, 4), np.uint8),
                                                   np.eye(4)).read_bytes()
    flip_tta = side == "viewer"
    request = SegmentationRequest(PROMPT, device="cpu", threshold=0.4, prompt_side=side, flip_tta=flip_tta)
    monailabel_client.infer(fake_server, "causalclipseg", image, request.server_params(), tmp_path / "out", timeout=10)
    params = re.search(rb'name="params"\r\n\r\n(.*?)\r\n--', _FakeMonaiLabel.received["body"], re.S).group(1)
    assert json.loads(params) == {"prompt": PROMPT, "prompt_side": side, "device": "cpu", "threshold": 0.4,
                                  "flip_tta": flip_tta}


@pytest.mark.parametrize("model, message", [
    ("broken", r"refused to run model 'broken': HTTP 500 Internal Server Error: Failed to execute infer$"),
    ("invalid", r"HTTP 422 Unprocessable Entity: field required$"),
    ("missing", r"HTTP 404 Not Found: Not Found$"),
    ("jsononly", r"returned no label image"),
    ("slow", r"did not answer within 0.3 s"),
])
def test_monailabel_errors_are_one_readable_line(tmp_path: Path, fake_server: str, model: str, message: str) -> None:
    image = volume_io.write_volume(tmp_path / "image.nii.gz", np.ones((1, 4, 4), np.int16), np.eye(4))
    with pytest.raises(monailabel_client.ServerError, match=message) as info:
        monailabel_client.infer(fake_server, model, image, {"prompt": "x"}, tmp_path, timeout=0.3)
    assert "\n" not in str(info.value) and fake_server in str(info.value)


def test_monailabel_down_or_not_a_server(fake_server: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(monailabel_client.ServerError, match="connection refused. Is it running?"):
        monailabel_client.info(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(monailabel_client.ServerError, match="not JSON: is it a MONAI Label server"):
        monailabel_client.info(fake_server + "/elsewhere", timeout=5)
    with pytest.raises(ValueError, match="must look like http://host:port"):
        monailabel_client.normalise_url("ftp://server")


# --- the local backend end to end, with the package's real CLI ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from causalclipseg import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_random.pt"
    torch.save(create_model("tiny").state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("shape, side", [((3, 40, 36), "patient"), ((1, 48, 40), "viewer")], ids=["3d", "2d-viewer"])
def test_local_backend_end_to_end(tmp_path: Path, tiny_checkpoint: Path, shape: tuple[int, int, int],
                                  side: str) -> None:
    """Volume -> job folder -> ``causalclipseg predict --prompt-side`` in a subprocess -> mask on the input's grid."""
    rng = np.random.default_rng(0)
    array = rng.normal(0, 100, shape).astype(np.float32)
    matrix = oblique_matrix()
    request = SegmentationRequest(PROMPT, device="cpu", threshold=0.5, model="tiny", checkpoint=str(tiny_checkpoint),
                                  prompt_side=side)
    job = prepare_job(tmp_path / "job", request, array, matrix)
    command = build_predict_command(sys.executable, job.request_file)
    assert command[command.index("--prompt-side") + 1] == side
    runner = ProcessRunner(command, env=child_environment(os.environ, own_interpreter=True))
    runner.start()
    state = runner.wait(timeout=120)
    assert state is RunState.SUCCEEDED, runner.output
    mask = volume_io.read_on_grid(job.mask_file, shape, matrix)  # strict: same shape and matrix
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 1}


@pytest.mark.slow
def test_local_backend_surfaces_cli_errors(tmp_path: Path) -> None:
    job = prepare_job(tmp_path / "job", SegmentationRequest("lesion", device="cpu", checkpoint=str(tmp_path / "no.pt"),
                                                            model="tiny"), np.zeros((1, 8, 8), np.float32), np.eye(4))
    runner = ProcessRunner(build_predict_command(sys.executable, job.request_file))
    runner.start()
    assert runner.wait(timeout=120) is RunState.FAILED
    with pytest.raises(ProcessFailedError, match="checkpoint not found"):
        runner.raise_for_status()


@pytest.mark.slow
def test_local_backend_runs_a_variant_of_ones_own(tmp_path: Path) -> None:
    """A variant the package does not ship (its config file under *Advanced → Model config*, its name under *Model*):
    the predict command and the warm model process both build it from the file and write the same mask."""
    import torch

    from causalclipseg import create_model
    from causalclipseg.registry import _CONFIG_DIR, _CONFIGS, add_model_config

    config = json.loads((_CONFIG_DIR / "tiny-nocausal.json").read_text())
    config["decoder"]["dim"] = 32
    variant = tmp_path / "slicer-variant.json"
    variant.write_text(json.dumps(config))
    try:
        add_model_config(variant)
        torch.manual_seed(0)
        weights = tmp_path / "variant.pt"
        torch.save(create_model("slicer-variant").state_dict(), weights)
    finally:
        _CONFIGS.pop("slicer-variant", None)
    shape, matrix = (1, 48, 40), oblique_matrix()
    array = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    request = SegmentationRequest(PROMPT, device="cpu", threshold=0.5, model="slicer-variant",
                                  model_config=str(variant), checkpoint=str(weights))
    masks = []
    for name in ("predict", "worker"):
        job = prepare_job(tmp_path / name, request, array, matrix)
        if name == "predict":
            runner = ProcessRunner(build_predict_command(sys.executable, job.request_file),
                                   env=child_environment(os.environ, own_interpreter=True))
            runner.start()
            assert runner.wait(timeout=120) is RunState.SUCCEEDED, runner.output
        else:
            worker = ModelWorker()
            try:
                run, _ = _run_to_end(worker, job)
                run.raise_for_status()
            finally:
                worker.stop()
        masks.append(volume_io.read_on_grid(job.mask_file, shape, matrix))
    np.testing.assert_array_equal(masks[0], masks[1])
    assert masks[0].shape == shape and set(np.unique(masks[0])) <= {0, 1}


# --- the local backend's warm model: one `causalclipseg worker` of the real package -------------------------


def _worker_job(folder: Path, checkpoint: Path, shape: tuple[int, int, int] = (1, 48, 40), **options: object):
    request = SegmentationRequest(PROMPT, device="cpu", model="tiny", checkpoint=str(checkpoint), **options)
    array = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    return prepare_job(folder, request, array, oblique_matrix())


def _start(worker: ModelWorker, job, idle_timeout: float = 600.0):
    run = worker.submit(sys.executable, job.request_file, child_environment(os.environ, own_interpreter=True),
                        idle_timeout)
    run.start()
    return run


def _run_to_end(worker: ModelWorker, job, idle_timeout: float = 600.0) -> tuple[object, list]:
    """Submit, wait; returns the run and its updates."""
    run, updates = _start(worker, job, idle_timeout), []
    run.wait(timeout=240, on_update=updates.append)
    return run, updates


def _lines(updates: list) -> list[str]:
    return [line for update in updates for line in update.lines]


def _group(pgid: int) -> list[int]:
    """The live processes of a process group (zombies count as gone)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def _until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


@pytest.mark.slow
def test_worker_keeps_one_process_for_later_runs_and_outlives_bad_requests(tmp_path: Path,
                                                                           tiny_checkpoint: Path) -> None:
    """One process serves every run (the model loaded once, progress and explanations coming through); a request
    that fails is answered in one line and the process serves the next."""
    worker = ModelWorker()
    try:
        first, updates = _run_to_end(worker, _worker_job(tmp_path / "a", tiny_checkpoint))
        assert first.state is RunState.SUCCEEDED, first.output
        lines = _lines(updates)
        assert lines[0].startswith(f"Started the model process (pid {first.pid}): {sys.executable} -m "
                                   "causalclipseg.cli worker --idle-timeout 600.")
        assert any(line.startswith("loading model 'tiny'") for line in lines)
        mask = volume_io.read_on_grid(tmp_path / "a" / "output" / "input_mask.nii.gz", (1, 48, 40), oblique_matrix())
        assert set(np.unique(mask)) <= {0, 1}

        shape = (10, 40, 36)  # two batches of slices: the worker's progress bar reaches the client
        job = _worker_job(tmp_path / "b", tiny_checkpoint, shape, explain=True, threshold=0.4)
        second, updates = _run_to_end(worker, job)
        assert second.state is RunState.SUCCEEDED, second.output
        assert second.pid == first.pid and worker.pid == first.pid
        lines = _lines(updates)
        assert lines[0] == f"Using the running model process (pid {first.pid}): the model is loaded."
        assert not any("loading model" in line for line in lines)
        assert any(update.progress is not None for update in updates)
        assert sorted(Path(f).name for f in second.files) == ["input_causal_mask.nii.gz", "input_mask.nii.gz",
                                                              "input_probability.nii.gz"]
        maps = explanations.read_explanations(job.explanation_files, shape, oblique_matrix())
        for values in maps.values():
            assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
            assert len(np.unique(values)) > 2  # a map, not a mask
        mask = volume_io.read_on_grid(job.mask_file, shape, oblique_matrix())
        np.testing.assert_array_equal(mask, maps["probability"] > 0.4)  # this request's own threshold

        unreadable = _worker_job(tmp_path / "unreadable", tiny_checkpoint)
        unreadable.input_file.write_bytes(b"\x1f\x8b not a volume")
        run, _ = _run_to_end(worker, unreadable)
        assert run.state is RunState.FAILED
        with pytest.raises(ProcessFailedError, match="input.nii.gz") as info:
            run.raise_for_status()
        assert "\n" not in str(info.value)
        empty = _worker_job(tmp_path / "empty", tiny_checkpoint)
        (empty.folder / "prompt.txt").write_text("  \n")
        run, _ = _run_to_end(worker, empty)
        with pytest.raises(ProcessFailedError, match=r"^prompt must contain text, got ''"):
            run.raise_for_status()
        assert worker.pid == first.pid and _alive(first.pid)
        good, updates = _run_to_end(worker, _worker_job(tmp_path / "good", tiny_checkpoint))
        assert good.state is RunState.SUCCEEDED and good.pid == first.pid
        assert _lines(updates)[0] == f"Using the running model process (pid {first.pid}): the model is loaded."
    finally:
        worker.stop()


@pytest.mark.slow
def test_cancel_ends_the_workers_process_group_and_the_next_run_starts_a_new_one(tmp_path: Path,
                                                                                tiny_checkpoint: Path) -> None:
    worker = ModelWorker()
    try:
        run = _start(worker, _worker_job(tmp_path / "a", tiny_checkpoint))
        pid, seen = run.pid, []
        assert _until(lambda: seen.extend(run.poll().lines) or any("loading model" in line for line in seen), 120)
        assert os.getpgid(pid) == pid  # the worker leads its own process group
        members = _group(pid)
        assert pid in members
        run.cancel(grace=2.0)
        assert run.state is RunState.CANCELLED and run.poll().state is RunState.CANCELLED
        run.raise_for_status()  # a cancelled run is not an error
        assert _until(lambda: not _group(pid) and not any(_alive(p) for p in members), 10)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        assert worker.pid is None
        following, updates = _run_to_end(worker, _worker_job(tmp_path / "b", tiny_checkpoint))
        assert following.state is RunState.SUCCEEDED, following.output
        assert following.pid != pid
        lines = _lines(updates)
        assert f"The model process (pid {pid}) has ended (stopped by Cancel); starting a new one, which loads the " \
               "model again." in lines
        assert any(line.startswith(f"Started the model process (pid {following.pid})") for line in lines)
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_killed_worker_is_replaced_with_the_reason(tmp_path: Path, tiny_checkpoint: Path) -> None:
    worker = ModelWorker()
    try:
        first, _ = _run_to_end(worker, _worker_job(tmp_path / "a", tiny_checkpoint))
        assert first.state is RunState.SUCCEEDED, first.output
        os.kill(first.pid, signal.SIGKILL)  # a crash, or the system ending it
        assert _until(lambda: worker.pid is None, 30)  # reaped: its threads have ended too
        second, updates = _run_to_end(worker, _worker_job(tmp_path / "b", tiny_checkpoint))
        assert second.state is RunState.SUCCEEDED, second.output
        assert second.pid != first.pid
        assert f"The model process (pid {first.pid}) has ended (killed by SIGKILL); starting a new one, which loads " \
               "the model again." in _lines(updates)
        # another checkpoint is another model: the worker is replaced, saying why
        other = tmp_path / "other.pt"
        other.write_bytes(tiny_checkpoint.read_bytes())
        third = _start(worker, _worker_job(tmp_path / "c", other))
        lines = third.poll().lines
        third.cancel()
        assert f"The interpreter, model, model config, checkpoint, device or idle timeout changed: the model process " \
               f"(pid {second.pid}) was stopped; starting a new one." in lines
        assert third.pid not in (first.pid, second.pid)
    finally:
        worker.stop()


@pytest.mark.slow
def test_an_idle_worker_exits_by_itself(tmp_path: Path, tiny_checkpoint: Path) -> None:
    worker = ModelWorker()
    try:
        first, _ = _run_to_end(worker, _worker_job(tmp_path / "a", tiny_checkpoint), idle_timeout=3)
        assert first.state is RunState.SUCCEEDED, first.output
        # exited and reaped (interpreter shutdown with torch loaded takes seconds on a busy machine)
        assert _until(lambda: worker.pid is None, 90), "the worker did not exit after 3 s without a request"
        assert not _alive(first.pid)
        second = _start(worker, _worker_job(tmp_path / "b", tiny_checkpoint), idle_timeout=3)
        lines = second.poll().lines
        second.cancel()
        assert f"The model process (pid {first.pid}) has ended (it exited: idle for 3 s: exiting); starting a new " \
               "one, which loads the model again." in lines
    finally:
        worker.stop()
