"""Volumes between Slicer's view of them and files, with the geometry kept exactly.

Slicer hands a volume over as a numpy array in KJI order (``slicer.util.arrayFromVolume``: slices, rows,
columns) and a 4x4 IJK-to-RAS matrix (``vtkMRMLVolumeNode.GetIJKToRASMatrix``). NIfTI stores an IJK-to-RAS
affine directly (data in IJK order); NRRD usually stores LPS ``space directions`` and ``space origin``, so the
first two world axes change sign. A single-slice picture (an X-ray) is a volume with one slice, K = 1.

nibabel and pynrrd are imported when a file of their format is read or written, so that the rest of this
package works without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["GridMismatchError", "write_volume", "read_volume", "same_grid", "resample_nearest", "read_on_grid",
           "to_scalar", "volume_suffix"]

# Sign of each world axis of an NRRD space relative to RAS.
_NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "scanner-xyz": (1, 1, 1),  # treated as RAS, as Slicer does
}
_NIFTI_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64)


class GridMismatchError(ValueError):
    """A result does not lie on the grid of the volume it was computed from."""


def volume_suffix(path: str | os.PathLike) -> str:
    """``.nii.gz``, ``.nii`` or ``.nrrd`` (lower case), or the plain suffix for anything else."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _as_kji(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:  # (J, I): one slice
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"a volume array must be (K, J, I) or (J, I), got shape {array.shape}")
    return array


def _check_matrix(ijk_to_ras: np.ndarray) -> np.ndarray:
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"ijk_to_ras must be a finite 4x4 matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError("ijk_to_ras is singular (a spacing of 0 or parallel axes)")
    return matrix


def _storable(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if any(array.dtype == t for t in _NIFTI_DTYPES):
        return array
    return array.astype(np.float32 if np.issubdtype(array.dtype, np.floating) else np.float64)


def to_scalar(array: np.ndarray) -> np.ndarray:
    """A scalar (K, J, I) array: a vector volume (K, J, I, C), e.g. an RGB picture, becomes its channel mean."""
    if array.ndim == 4:
        return array.mean(axis=-1, dtype=np.float32) if array.shape[-1] > 1 else array[..., 0]
    return array


def write_volume(path: str | os.PathLike, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write a scalar volume as NIfTI (``.nii``/``.nii.gz``) or NRRD (``.nrrd``) with its exact geometry.

    Args:
        path: target file; the suffix picks the format.
        array_kji: (K, J, I) voxels, or (J, I) for one slice.
        ijk_to_ras: 4x4 matrix from voxel indices (i, j, k) to RAS millimetres.

    Returns:
        The written path.

    Raises:
        ValueError: for an unsupported suffix, a bad array shape or a singular matrix.
    """
    path = Path(path)
    data = _storable(np.ascontiguousarray(_as_kji(np.asarray(array_kji)).transpose(2, 1, 0)))  # (I, J, K)
    matrix = _check_matrix(ijk_to_ras)
    suffix = volume_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        image = nib.Nifti1Image(data, matrix)
        image.set_sform(matrix, code=1)  # scanner RAS
        image.set_qform(matrix, code=1)
        nib.save(image, str(path))
    elif suffix == ".nrrd":
        import nrrd

        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
        header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,  # one row per axis
                  "space origin": lps[:3, 3], "kinds": ["domain"] * 3, "encoding": "gzip"}
        nrrd.write(str(path), data, header, index_order="F")
    else:
        raise ValueError(f"cannot write {path.name}: use a .nii, .nii.gz or .nrrd file name")
    return path


def _complete_directions(directions: np.ndarray) -> np.ndarray:
    """3x3 matrix with one column per voxel axis; a 2-D image gets a unit normal as its third axis."""
    if directions.shape[1] == 3:
        return directions
    if directions.shape[1] == 2:
        normal = np.cross(directions[:, 0], directions[:, 1])
        return np.column_stack([directions, normal / np.linalg.norm(normal)])
    raise ValueError(f"expected 2 or 3 spatial axes, got {directions.shape[1]}")


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nrrd

    data, header = nrrd.read(str(path), index_order="F")  # (I, J[, K])
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _NRRD_SPACES:
        raise ValueError(f"cannot read {path.name}: NRRD space {space!r} is not one of {sorted(_NRRD_SPACES)}")
    if "space directions" in header:
        rows = np.asarray(header["space directions"], dtype=np.float64)
        spatial = [axis for axis, row in enumerate(rows) if np.all(np.isfinite(row))]
        if len(spatial) != data.ndim:
            raise ValueError(f"cannot read {path.name}: it has non-spatial axes (kinds {header.get('kinds')}); "
                             "expected a scalar image")
        directions = rows[spatial].T  # one column per voxel axis
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    else:
        spacings = np.asarray(header.get("spacings", np.ones(data.ndim)), dtype=np.float64)
        directions, origin = np.diag(spacings), np.zeros(3)
    matrix = np.eye(4)
    matrix[:3, :3] = _complete_directions(directions)
    matrix[:3, 3] = origin
    return data, np.diag([*_NRRD_SPACES[space], 1.0]) @ matrix


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a scalar NIfTI or NRRD volume.

    Returns:
        The (K, J, I) array (a 2-D file gives K = 1) and its 4x4 IJK-to-RAS matrix.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: for an unsupported format or a file that is not a scalar 2-D or 3-D image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    suffix = volume_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        image = nib.load(str(path))
        data, matrix = np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
    elif suffix == ".nrrd":
        data, matrix = _read_nrrd(path)
    else:
        raise ValueError(f"cannot read {path.name}: expected a .nii, .nii.gz or .nrrd file")
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(f"cannot read {path.name}: expected a scalar 2-D or 3-D image, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), matrix


def _matrix_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest element difference, relative for elements larger than 1 (NIfTI stores float32)."""
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


def same_grid(shape_a: tuple[int, ...], matrix_a: np.ndarray, shape_b: tuple[int, ...], matrix_b: np.ndarray,
              tolerance: float = 1e-5) -> bool:
    """Whether two (K, J, I) shapes and IJK-to-RAS matrices describe the same voxel grid.

    Matrix elements may differ by ``tolerance`` (relative to the element for elements larger than 1).
    """
    return tuple(shape_a) == tuple(shape_b) and _matrix_difference(np.asarray(matrix_a), np.asarray(matrix_b)) \
        <= tolerance


def resample_nearest(array_kji: np.ndarray, ijk_to_ras: np.ndarray, target_shape: tuple[int, int, int],
                     target_ijk_to_ras: np.ndarray, fill: float = 0) -> np.ndarray:
    """Nearest-neighbour resampling of a (K, J, I) array onto another grid, one target slice at a time.

    Voxels of the target that fall outside the source get ``fill``.
    """
    source_from_target = np.linalg.inv(_check_matrix(ijk_to_ras)) @ _check_matrix(target_ijk_to_ras)
    out = np.full(target_shape, fill, dtype=array_kji.dtype)
    jj, ii = np.meshgrid(np.arange(target_shape[1]), np.arange(target_shape[2]), indexing="ij")  # (J, I)
    limits = np.array(array_kji.shape[::-1])[:, None]  # I, J, K sizes of the source
    for k in range(target_shape[0]):
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)])  # (4, J*I)
        src = np.rint(source_from_target @ ijk)[:3].astype(np.int64)  # (3, J*I): i, j, k in the source
        inside = np.all((src >= 0) & (src < limits), axis=0)
        values = np.full(ii.size, fill, dtype=array_kji.dtype)
        values[inside] = array_kji[src[2, inside], src[1, inside], src[0, inside]]
        out[k] = values.reshape(ii.shape)
    return out


def read_on_grid(path: str | os.PathLike, shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray,
                 allow_resample: bool = False) -> np.ndarray:
    """Read a result (a mask or a map) and return it as a (K, J, I) array on the given grid.

    Args:
        path: NIfTI or NRRD file.
        shape_kji: shape of the input volume.
        ijk_to_ras: geometry of the input volume.
        allow_resample: resample (nearest neighbour) a result that lies on another grid instead of failing.

    Raises:
        GridMismatchError: if the result is on another grid and ``allow_resample`` is false.
        FileNotFoundError, ValueError: as :func:`read_volume`.
    """
    array, matrix = read_volume(path)
    if same_grid(array.shape, matrix, shape_kji, ijk_to_ras):
        return array
    if allow_resample:
        return resample_nearest(array, matrix, tuple(shape_kji), ijk_to_ras)
    raise GridMismatchError(
        f"the result {Path(path).name} is not on the input's grid: shape {tuple(array.shape)} vs {tuple(shape_kji)} "
        f"(K, J, I), largest matrix difference {_matrix_difference(matrix, np.asarray(ijk_to_ras)):.3g}")
