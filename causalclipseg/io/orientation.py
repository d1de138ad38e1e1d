"""One display orientation into the model, and back to the input's grid.

The model learned frontal chest X-rays in standard display: the patient's head up and the patient's LEFT on the
image's RIGHT (the heart shadow on the image's right). Which side of an array is the patient's left depends on how
the file was written, so every input is brought to the orientation a viewer shows before the model sees it, and
the prediction is brought back to the input's exact voxel grid afterwards (a permutation and flips of voxels: no
resampling, nothing lost):

- pictures (PNG, JPEG, BMP, TIFF) carry no geometry: they are taken as stored, i.e. in standard display;
- DICOM by its orientation attributes: Image Orientation (Patient) where present (CT/MR slices and series, read
  into the affine by MONAI's reader), else Patient Orientation (projection radiographs: the directions of the
  rows and columns, e.g. ``L\\F`` for standard display);
- NIfTI and NRRD by their affine (NIfTI with a qform or sform code, NRRD with a ``space``);
- anything else (a DICOM without either attribute, a NIfTI with neither code, an NRRD without a space) is taken
  as stored, and flagged, so that a prompt naming a side can warn that the side cannot be checked.

Which plane is segmented: a single slice (an X-ray, one CT slice) in its own plane; a volume along its
acquisition's slice axis, the voxel axis with the largest spacing (ties: the one closest to head-feet, so an
isotropic volume is cut in axial slices), however its voxels are ordered in the file. In-plane, slices are laid
out as 3D Slicer's views show them (radiological convention; ``vtkMRMLSliceNode``'s default presets):

==========  =====================  ======================  =====================
plane       image's right (x)      image's bottom (y)      slice axis (z)
==========  =====================  ======================  =====================
axial       patient's left (L)     posterior (P)           superior (S)
coronal     patient's left (L)     inferior (I)            anterior (A)
sagittal    posterior (P)          inferior (I)            patient's left (L)
==========  =====================  ======================  =====================

Codes are nibabel's (each letter is where an axis points): an axial volume in display orientation is ``LPS``.
:class:`DisplayOrientation` is MONAI's ``Orientation`` with the target chosen per image from that table, so it is
invertible the MONAI way (``inverse`` on the prediction, or ``Invertd``).
"""

from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Orientation, Orientationd

__all__ = ["GEOMETRY_KEY", "GEOMETRIES", "DisplayOrientation", "DisplayOrientationd", "display_axcodes",
           "patient_orientation_affine", "slice_axis"]

#: MetaTensor ``meta`` entry the loader sets: where an input's orientation comes from (one of :data:`GEOMETRIES`)
GEOMETRY_KEY = "causalclipseg_geometry"
#: ``picture``: taken as stored (standard display); ``affine``: the file's geometry; ``unknown``: taken as stored,
#: though the file does not say how it is oriented
GEOMETRIES = ("picture", "affine", "unknown")

#: nibabel's axis labels for RAS affines (MONAI's readers convert DICOM's and NRRD's LPS to RAS)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: target codes per plane, indexed by the world axis (0 R-L, 1 A-P, 2 S-I) the slice axis points along
_DISPLAY_CODES = {2: "LPS", 1: "LIA", 0: "PIL"}
#: Patient Orientation letters (DICOM PS3.3 C.7.6.1.1.1) as RAS unit vectors; H(ead) and F(eet) are S and I
_PATIENT_DIRECTIONS = {"L": (-1.0, 0.0, 0.0), "R": (1.0, 0.0, 0.0), "A": (0.0, 1.0, 0.0), "P": (0.0, -1.0, 0.0),
                       "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0)}


def slice_axis(affine: np.ndarray, spatial_shape: tuple[int, ...]) -> int:
    """The voxel axis segmented slice by slice: the last one for a single slice or a 2-D image, else the axis with
    the largest spacing (the acquisition's slice axis), ties going to the axis closest to head-feet."""
    if len(spatial_shape) < 3 or spatial_shape[2] == 1:
        return 2
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    widest = np.flatnonzero(spacing >= spacing.max() * (1 - 1e-3))
    if len(widest) == 1:
        return int(widest[0])
    world = nib.io_orientation(affine)[:, 0]
    return int(next((a for a in widest if world[a] == 2), widest[-1]))


def display_axcodes(affine: np.ndarray, spatial_shape: tuple[int, ...]) -> str:
    """nibabel axis codes of the display orientation of an image with this 4x4 voxel-to-RAS ``affine``."""
    world = nib.io_orientation(np.asarray(affine, dtype=np.float64))[:, 0].astype(int)
    return _DISPLAY_CODES[int(world[slice_axis(affine, spatial_shape)])]


def patient_orientation_affine(codes: tuple[str, str], spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray | None:
    """A 4x4 voxel-to-RAS affine for a projection radiograph from its DICOM Patient Orientation.

    ``codes`` are the directions of the rows (from the first column to the last: MONAI's x) and of the columns
    (from the first row to the last: MONAI's y), e.g. ``("L", "F")`` for standard display; of a compound code
    (``"LF"``, an oblique direction) the first letter counts. ``spacing`` is (column spacing, row spacing).
    Returns ``None`` when the codes do not give two perpendicular directions (missing, ``A``/``P`` with ``A``/``P``).
    """
    try:
        x, y = (np.array(_PATIENT_DIRECTIONS[str(c).strip().upper()[:1]]) for c in codes)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    normal = np.cross(x, y)
    if not normal.any():
        return None
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = x * spacing[0], y * spacing[1], normal
    return affine


class DisplayOrientation(Orientation):
    """Reorient a channel-first image ``(C, X, Y[, Z])`` to its display orientation (module docstring); invertible.

    The target codes are chosen per image from its affine and the loader's :data:`GEOMETRY_KEY` entry (pictures
    and images of unknown orientation are left as stored, and still traced, so that ``inverse`` always applies).
    A 2-D image is reoriented as one slice ``(C, X, Y, 1)`` with its 4x4 affine, and comes back 2-D. ``inverse``
    takes a prediction carrying the image's applied operations (as ``Invertd`` copies them) back to the input's
    voxel grid and affine.
    """

    def __init__(self) -> None:
        super().__init__(axcodes="RAS", labels=_RAS_LABELS)
        self._lock = threading.Lock()  # the codes are set per call on a transform shared between requests

    def __call__(self, data_array: torch.Tensor, lazy: bool | None = None) -> torch.Tensor:
        """``data_array`` ``(C, X, Y[, Z])`` MetaTensor with a 4x4 affine -> the same in display orientation."""
        if not isinstance(data_array, MetaTensor):
            raise TypeError(f"image must be a MetaTensor with its affine (as MONAI's loaders give), got "
                            f"{type(data_array).__name__}")
        flat = data_array.ndim == 3
        img = data_array.unsqueeze(-1) if flat else data_array  # (C, X, Y) -> (C, X, Y, 1)
        affine = np.asarray(img.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"image affine must be 4x4, got shape {affine.shape}")
        if img.meta.get(GEOMETRY_KEY, "affine") == "affine":
            codes = display_axcodes(affine, tuple(img.shape[1:]))
        else:
            codes = "".join(nib.aff2axcodes(affine))  # as stored
        with self._lock:
            self.axcodes = codes
            out = super().__call__(img, lazy=False)
        return out.squeeze(-1) if flat else out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """A prediction in display orientation -> the input's grid (2-D stays 2-D)."""
        flat = data.ndim == 3
        img = data.unsqueeze(-1) if flat else data
        with self._lock:
            out = super().inverse(img)
        return out.squeeze(-1) if flat else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DisplayOrientationd(Orientationd):
    """Dictionary version of :class:`DisplayOrientation` (MONAI's ``Orientationd`` with that array transform), so
    that ``Invertd`` brings predictions back to the input's grid.

    Args:
        keys: the image keys.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, axcodes="RAS", labels=_RAS_LABELS, allow_missing_keys=allow_missing_keys)
        self.ornt_transform = DisplayOrientation()
