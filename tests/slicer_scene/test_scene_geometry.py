"""The module Lib's volume files against Slicer's own storage nodes, both ways: what the Lib writes, Slicer loads on
the same grid with the same voxels, and what Slicer saves, the Lib reads the same. No model runs here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed here: see tests/slicer_scene/run.sh")

from scene import MODULE_DIR, PNG_IJK_TO_RAS, assert_same_geometry, ijk_to_ras, oblique_ijk_to_ras  # noqa: E402

# Each element of a NIfTI header is float32; NRRD writes its numbers in full ("%.17g").
TOLERANCE = {".nrrd": 1e-12, ".nii.gz": 1e-6}

CASES = {
    "oblique": ((5, 7, 9), oblique_ijk_to_ras(), np.int16),
    "single_slice_xray": ((1, 48, 40), np.diag([-0.143, -0.143, 1.0, 1.0]) @ np.array(
        [[1, 0, 0, -12.5], [0, 1, 0, 30.25], [0, 0, 1, 0], [0, 0, 0, 1.0]]), np.uint8),
    "float_volume": ((4, 6, 5), np.array([[0.0, 0.0, 2.5, 10.0], [-0.9, 0.0, 0.0, 20.0], [0.0, -1.1, 0.0, -30.0],
                                          [0.0, 0.0, 0.0, 1.0]]), np.float32),
}


@pytest.fixture(scope="module")
def volume_io(module):
    """The Lib's volume reader and writer, as the module imports them."""
    from TextPromptSegmentationLib import volume_io

    assert Path(volume_io.__file__).resolve().parent == (MODULE_DIR / "TextPromptSegmentationLib").resolve()
    return volume_io


def make_array(shape: tuple[int, int, int], dtype: type) -> np.ndarray:
    """Distinct values in every voxel (so any flip or transposition shows), in range for ``dtype``."""
    values = np.arange(int(np.prod(shape))).reshape(shape) % (200 if dtype == np.uint8 else 30000)
    return (values * 1.25 if dtype == np.float32 else values).astype(dtype)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("case", CASES)
def test_slicer_loads_what_the_lib_writes(volume_io, tmp_path: Path, case: str, suffix: str) -> None:
    shape, matrix, dtype = CASES[case]
    array = make_array(shape, dtype)
    path = volume_io.write_volume(tmp_path / f"lib{suffix}", array, matrix)
    node = slicer.util.loadVolume(str(path))
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert_same_geometry(ijk_to_ras(node), matrix, TOLERANCE[suffix])
    loaded = slicer.util.arrayFromVolume(node)
    assert loaded.shape == shape and loaded.dtype == array.dtype
    assert np.array_equal(loaded, array)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("case", CASES)
def test_lib_reads_what_slicer_saves(volume_io, tmp_path: Path, case: str, suffix: str) -> None:
    shape, matrix, dtype = CASES[case]
    array = make_array(shape, dtype)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name=case)
    path = tmp_path / f"slicer{suffix}"
    assert slicer.util.saveNode(node, str(path))
    read, read_matrix = volume_io.read_volume(path)
    assert_same_geometry(read_matrix, matrix, TOLERANCE[suffix])
    assert read.shape == shape and read.dtype == array.dtype
    assert np.array_equal(read, array)
    assert volume_io.same_grid(read.shape, read_matrix, shape, matrix)  # what the module checks a result with


def test_labelmap_round_trip_keeps_the_grid_a_result_is_checked_against(volume_io, tmp_path: Path) -> None:
    """A 0/1 mask written by the Lib on a picture's grid loads in Slicer as a labelmap on that grid, and Slicer's
    labelmap saved as NIfTI passes the Lib's strict grid check (``read_on_grid`` without resampling)."""
    shape = (1, 30, 20)
    mask = np.zeros(shape, np.uint8)
    mask[0, 5:12, 14:19] = 1  # on the picture's right: the patient's left
    path = volume_io.write_volume(tmp_path / "mask.nii.gz", mask, PNG_IJK_TO_RAS)
    labelmap = slicer.util.loadLabelVolume(str(path))
    assert labelmap.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    assert np.array_equal(slicer.util.arrayFromVolume(labelmap), mask)
    assert_same_geometry(ijk_to_ras(labelmap), PNG_IJK_TO_RAS, 0.0)
    assert slicer.util.saveNode(labelmap, str(tmp_path / "saved.nii.gz"))
    assert np.array_equal(volume_io.read_on_grid(tmp_path / "saved.nii.gz", shape, PNG_IJK_TO_RAS), mask)
