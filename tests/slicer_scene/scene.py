"""What the Slicer scene tests share: the inputs and how Slicer would load them, geometry checks, process trees."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "slicer_extension" / "TextPromptSegmentation"
MODULE_FILE = MODULE_DIR / "TextPromptSegmentation.py"
QATA_ROOT = REPO.parent / "shared" / "data" / "qata_cov19"
# A QaTa-COV19 chest X-ray shipped with the bundle (224 x 224, 8-bit grey) whose lesion is in the lower lung on the
# patient's left (its caption, in QaTa's viewer convention: "lower right lung").
SAMPLE_XRAY = REPO / "bundle" / "sample_data" / "sub-s11251_ses-e26227_run-1_bp-chest_vp-ap_cr.png"
# The patient's left (the module's default side). QaTa-COV19's captions name the viewer's sides: a caption naming
# the viewer's right describes the same lung.
PROMPT = "Unilateral pulmonary infection, one infected area, lower left lung."
QATA_CAPTION_SAME_LUNG = "unilateral pulmonary infection, one infected area, lower right lung."
MODEL_TIMEOUT = 300.0  # seconds for one Logic.process or predict call (seconds on a free CPU)
# Slicer's PNG reader (ITK) gives a picture the LPS identity: IJK-to-RAS diag(-1, -1, 1), columns towards the
# patient's left (RAS x decreases), rows towards posterior, as the axial view shows it.
PNG_IJK_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_ijk_to_ras(spacing: tuple[float, float, float] = (0.7, 0.8, 3.0),
                       origin: tuple[float, float, float] = (-80.5, 95.25, 410.0)) -> np.ndarray:
    """An oblique IJK-to-RAS: rotated 20 degrees about S and 10 about A, anisotropic spacing, a far origin. Columns
    point towards the patient's left and rows towards posterior (as in a picture), so the slices are upright."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_a = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = about_s @ about_a @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    matrix[:3, 3] = origin
    return matrix


# ------------------------------------------------------------------------------------------ inputs
def read_picture(path: Path) -> np.ndarray:
    """A picture's pixels as stored: (rows, columns) for grey, (rows, columns, 3) for colour."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB" if image.mode in ("RGB", "RGBA", "P") else "L"))


def add_png_volume(path: Path, name: str | None = None) -> slicer.vtkMRMLVolumeNode:
    """Put a PNG in the scene as Slicer's reader does: one slice, IJK-to-RAS diag(-1, -1, 1); a grey picture as a
    scalar volume, a colour one as a vector volume (read here with PIL: slicer-core has no PNG reader)."""
    pixels = read_picture(path)[None]  # (1, rows, columns[, 3]): K, J, I order
    node_class = "vtkMRMLVectorVolumeNode" if pixels.ndim == 4 else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(pixels, ijkToRAS=PNG_IJK_TO_RAS, name=name or path.name.split(".")[0],
                                          nodeClassName=node_class)


def oblique_array() -> np.ndarray:
    """Three slices (K, J, I) made from the sample X-ray as CT-like int16 values, each slice a little brighter."""
    picture = read_picture(SAMPLE_XRAY).astype(np.int16)
    return np.stack([picture * 4 - 1000 + 40 * k for k in range(3)]).astype(np.int16)


def rgb_array() -> np.ndarray:
    """The sample X-ray as a tinted colour picture, one slice: (1, J, I, 3) uint8, the channels different."""
    picture = read_picture(SAMPLE_XRAY).astype(np.float64)
    return np.stack([picture, picture * 0.85, picture * 0.7], axis=-1).round().astype(np.uint8)[None]


def qata_same_lung_image() -> Path | None:
    """The first QaTa-COV19 validation X-ray (by name) whose caption names only the lower lung on the viewer's right,
    i.e. the patient's left; ``None`` without the data."""
    annotation = QATA_ROOT / "prompts" / "annotation.json"
    if not annotation.is_file():
        return None
    rows = json.loads(annotation.read_text())["valid"]
    names = sorted(r["image_path"].removeprefix("mask_") for r in rows if r["caption"] == QATA_CAPTION_SAME_LUNG)
    image = QATA_ROOT / "images" / "valid" / "images" / names[0]
    return image if image.is_file() else None


# ------------------------------------------------------------------------------------------ geometry
def ijk_to_ras(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """A volume node's IJK-to-RAS matrix."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def assert_same_geometry(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Two IJK-to-RAS matrices agree: each element within ``tolerance``, relative to it for elements above 1."""
    difference = np.abs(np.asarray(actual) - np.asarray(expected)) / np.maximum(1.0, np.abs(expected))
    assert difference.max() <= tolerance, f"IJK-to-RAS differs by {difference.max():.3g}:\n{actual}\nvs\n{expected}"


def save_with_slicer(array: np.ndarray, matrix: np.ndarray, path: Path) -> Path:
    """Write an array on a grid with Slicer's own storage node (``slicer.util.saveNode``); the node is removed."""
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name=path.name.split(".")[0])
    try:
        assert slicer.util.saveNode(node, str(path)), f"Slicer could not write {path}"
    finally:
        slicer.mrmlScene.RemoveNode(node)
    return path


def segment_labelmap(segmentation: slicer.vtkMRMLSegmentationNode, segment_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A segment's own binary labelmap as stored in the segmentation: the (K, J, I) array over its extent and the
    IJK-to-RAS matrix of voxel (0, 0, 0) of its grid (``vtkOrientedImageData``'s image-to-world)."""
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    image = segmentation.GetBinaryLabelmapInternalRepresentation(segment_id)
    layer = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation, segment_id)  # may hold other segments
    labelmap = (layer == segment.GetLabelValue()).astype(np.uint8)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    offset = np.eye(4)
    offset[:3, 3] = image.GetExtent()[::2]  # the array starts at the extent's first voxel
    return labelmap, slicer.util.arrayFromVTKMatrix(matrix) @ offset


def segment_points_ras(segmentation: slicer.vtkMRMLSegmentationNode, segment_id: str) -> np.ndarray:
    """The RAS positions (N, 3) of the segment's voxels, from the segment's own labelmap and geometry."""
    labelmap, matrix = segment_labelmap(segmentation, segment_id)
    k, j, i = np.nonzero(labelmap)
    return (matrix @ np.stack([i, j, k, np.ones_like(i)]).astype(np.float64))[:3].T


def axial_screen_right() -> np.ndarray:
    """The RAS direction of the screen's right in Slicer's default axial view (``vtkMRMLSliceNode``'s preset, the
    patient's right on the screen's left)."""
    orientation = vtk.vtkMatrix3x3()
    slicer.vtkMRMLSliceNode.GetAxialSliceToRASMatrix(orientation, True)
    return np.array([orientation.GetElement(row, 0) for row in range(3)])


# ------------------------------------------------------------------------------------------ the module's results
def request(**options: object):
    """The module's ``SegmentationRequest`` for :data:`PROMPT` on the CPU (as the reference masks), with ``options``."""
    from TextPromptSegmentationLib.request import SegmentationRequest

    return SegmentationRequest(**{"prompt": PROMPT, "device": "cpu", **options})


def assert_segment_is_the_reference(volume: slicer.vtkMRMLVolumeNode, segmentation: slicer.vtkMRMLSegmentationNode,
                                    segment_id: str, reference: np.ndarray) -> None:
    """The segment, named and coloured after the prompt, lies on the volume's own grid (its labelmap's geometry is
    the volume's, nothing resampled) and holds exactly the reference mask's voxels, which are not few."""
    from TextPromptSegmentationLib import segments

    shape = slicer.util.arrayFromVolume(volume).shape[:3]
    assert reference.shape == shape and reference.sum() >= 100, "the model found nothing: the check would be empty"
    found = segmentation.GetSegmentation().GetSegment(segment_id)
    assert found.GetName() == segments.segment_name(PROMPT)
    np.testing.assert_allclose(found.GetColor(), segments.segment_color(PROMPT), atol=1e-6)
    labelmap, matrix = segment_labelmap(segmentation, segment_id)
    direction = ijk_to_ras(volume)
    assert_same_geometry(matrix[:3, :3], direction[:3, :3], 1e-6)  # same axes and spacing (stored as text)
    origin_index = np.linalg.solve(direction, matrix[:, 3])[:3]  # where the labelmap starts, in the volume's IJK
    np.testing.assert_allclose(origin_index, np.round(origin_index), atol=1e-4)
    on_grid = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    assert on_grid.shape == shape
    assert int(on_grid.sum()) == int(labelmap.sum())  # nothing cropped away or added by resampling
    mismatched = int((on_grid != reference).sum())
    assert mismatched == 0, f"{mismatched} voxels differ from causalclipseg predict's mask ({int(reference.sum())})"


# ------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class ProcessInfo:
    """A process as ``/proc/<pid>/stat`` describes it."""

    pid: int
    ppid: int
    pgid: int
    state: str
    command: str


def _process(pid: int) -> ProcessInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
    return ProcessInfo(pid, int(fields[1]), int(fields[2]), fields[0], command)


def live_processes() -> dict[int, ProcessInfo]:
    """Every live process (zombies left out), by pid."""
    found = (_process(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return {info.pid: info for info in found if info is not None and info.state != "Z"}


def descendants(root: int | None = None) -> dict[int, ProcessInfo]:
    """The live descendants of ``root`` (this process by default), by pid."""
    processes = live_processes()
    children: dict[int, list[int]] = {}
    for info in processes.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: dict[int, ProcessInfo] = {}
    stack = list(children.get(root or os.getpid(), []))
    while stack:
        pid = stack.pop()
        found[pid] = processes[pid]
        stack.extend(children.get(pid, []))
    return found


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds have passed; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def assert_one_readable_line(error: BaseException, *fragments: str) -> str:
    """The error's message as the module's panel shows it: one line of words, no traceback, naming ``fragments``."""
    message = str(error)
    assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"
    assert "Traceback" not in message and len(message) < 600, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message
