"""Reading an image file or DICOM series into what the slice-wise network takes, on its own grid."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import LoadImage, MapTransform

from ..data.transforms import Grayscale2D
from .dicom import voi_display
from .formats import MAX_INPUT_VOXELS, InputHeader, Unreadable, error_reason, read_input_header
from .orientation import GEOMETRY_KEY, patient_orientation_affine

__all__ = ["SOURCE_FILES_KEY", "LoadSegmentableImaged"]

logger = logging.getLogger(__name__)

#: MetaTensor ``meta`` entry of a DICOM input: the file each slice of the array came from, in the array's slice order
#: (a radiograph or a slice: one file; a series: its files as MONAI's reader stacked them, by Instance Number)
SOURCE_FILES_KEY = "causalclipseg_source_files"


def _plain_picture(image: Any) -> Any:
    """PIL converter: palette, CMYK, YCbCr, ... pictures to RGB, gray + alpha to gray; gray, RGB(A), 16-bit and
    float pictures as they are (a palette picture's raw values are colour indices, not intensities)."""
    if image.mode in ("1", "L", "RGB", "RGBA", "F") or image.mode.startswith("I"):
        return image
    return image.convert("L" if image.mode in ("LA", "La") else "RGB")


def _complete_slice_normal(img: torch.Tensor) -> None:
    """Make a DICOM affine invertible, in place: for a single slice (or slices at one position) MONAI's reader
    sets the third column to ``(0, 0, 1)`` (or zero) whatever the slice's plane, which is singular for sagittal and
    coronal slices; the column becomes the slice normal (row x column direction), keeping its length (1 if none)."""
    affine = getattr(img, "affine", None)
    if affine is None or tuple(affine.shape) != (4, 4):
        return
    a = affine.detach().cpu().double().clone()
    if abs(float(torch.linalg.det(a[:3, :3]))) > 1e-12:
        return
    normal = torch.linalg.cross(a[:3, 0], a[:3, 1])
    if float(normal.norm()) < 1e-12:
        return  # the in-plane directions themselves are broken: left as read
    length = float(a[:3, 2].norm()) or 1.0
    a[:3, 2] = normal / normal.norm() * length
    img.affine = a.to(affine.dtype)


class _SourceRecordingPydicomReader(PydicomReader):
    """MONAI's ``PydicomReader`` that records the file each slice of the array it returns came from.

    MONAI stacks a series in an order of its own (by Instance Number, skipping files without one) and keeps no trace
    of it; a mask written back onto the source instances (a DICOM Segmentation, :mod:`causalclipseg.io.dicom_seg`)
    needs it. The reader decodes each file's pixels through ``_get_array_data`` in the order it stacks them, so the
    order is recorded there, as it happens, rather than re-derived; :data:`SOURCE_FILES_KEY` in the metadata holds it.
    """

    def get_data(self, data: Any) -> tuple[Any, dict]:
        self._sources: list[str] = []
        array, meta = super().get_data(data)
        meta[SOURCE_FILES_KEY] = list(self._sources)
        return array, meta

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        self._sources.append(str(filename))
        return super()._get_array_data(img, filename)


def _quiet_load_image() -> LoadImage:
    """MONAI's ``LoadImage`` without the warnings its GPU DICOM reader prints on machines without nvImageCodec."""
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    disabled, plugin_log.disabled = plugin_log.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True, ensure_channel_first=True)
    finally:
        plugin_log.disabled = disabled


class LoadSegmentableImaged(MapTransform):
    """Read an image file or DICOM series into what the slice-wise network takes, on its own grid (no resampling).

    MONAI's readers read it (PNG/JPEG/BMP/TIFF, DICOM file or series folder, NIfTI, NRRD) channel first with its
    metadata (affine, file name, :data:`~causalclipseg.io.orientation.GEOMETRY_KEY`: where its orientation
    comes from, a radiograph's affine built from its Patient Orientation; for DICOM, :data:`SOURCE_FILES_KEY`: the
    file of each slice); 2-D inputs (and volumes with one slice) become grayscale ``(1, X, Y)`` (colour merged,
    alpha dropped, as in training); volumes stay ``(1, X, Y, Z)``.
    :class:`~causalclipseg.io.orientation.DisplayOrientation` then orients them for the model.

    Input policy (every refusal is a ``ValueError`` naming the file and the reason, before anything is written):

    - the format is recognised by the file's content; a name promising another format (a PNG named ``.dcm``)
      is refused with the name to use; empty files and other formats are refused;
    - the header is read first, and an input holding more than :data:`MAX_INPUT_VOXELS` values is refused before
      any decoding, as is DICOM whose compressed pixel data no installed decoder reads, or DICOM without an image;
    - DICOM is shown as a viewer shows it (:func:`causalclipseg.io.dicom.voi_display`: modality LUT, the first
      window or VOI LUT, ``MONOCHROME1`` and Presentation LUT Shape inversion), colour (RGB, YBR) is merged
      to gray like colour pictures; ``PALETTE COLOR`` and multi-frame colour DICOM are refused; palette and CMYK
      pictures are converted to RGB first (their raw values are not intensities);
    - 4-D inputs (time series, several values per voxel) and multi-page pictures are refused: extract one image;
    - NaN or infinite values are refused rather than guessed (a mask of a partly undefined image could look
      right and be wrong), and so is an image whose pixels all have one value (there is nothing to segment).

    Args:
        keys: keys holding the file or folder to read.
        max_voxels: the size limit, :data:`MAX_INPUT_VOXELS` by default.

    Raises:
        ValueError: as above, naming the file.
    """

    def __init__(self, keys: str | Sequence[str] = "image", allow_missing_keys: bool = False,
                 max_voxels: int = MAX_INPUT_VOXELS) -> None:
        super().__init__(keys, allow_missing_keys)
        from monai.data import NibabelReader, NrrdReader, PILReader

        self.loader = _quiet_load_image()
        self.readers = {"picture": PILReader(converter=_plain_picture), "DICOM": _SourceRecordingPydicomReader(),
                        "NIfTI": NibabelReader(), "NRRD": NrrdReader()}
        self.max_voxels = max_voxels
        self.grayscale = Grayscale2D("mean")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            if not isinstance(source, (str, os.PathLike)):
                raise TypeError(f"{key} must be a file or folder path, got {type(source).__name__}")
            caught: list[warnings.WarningMessage] = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    header = read_input_header(source, self.max_voxels)
                    self._check_header(header)
                    img = self.loader(str(source), reader=self.readers[header.kind])
            except Unreadable as err:
                raise ValueError(f"cannot read {source}: {err}") from err
            except Exception as err:  # noqa: BLE001 - readers raise many types; all mean "unreadable"
                raise ValueError(f"cannot read {source}: {error_reason(err)}") from err
            finally:
                for warning in caught:  # readers' remarks on odd headers: kept out of the user's terminal
                    logger.debug("%s: %s", source, warning.message)
            if header.kind == "DICOM":
                if header.samples == 1:  # as a viewer shows it: modality LUT, first window or VOI LUT, inversion
                    img = MetaTensor(torch.from_numpy(voi_display(img.numpy(), header.dataset))).copy_meta_from(img)
                img = self._dicom_colour(img, header)
                _complete_slice_normal(img)
                if header.patient_orientation is not None:
                    img.affine = torch.as_tensor(patient_orientation_affine(header.patient_orientation,
                                                                            header.pixel_spacing))
            img.meta[GEOMETRY_KEY] = header.geometry
            spatial = [s for s in img.shape[1:]]
            while len(spatial) > 2 and spatial[-1] == 1:
                spatial.pop()
            if len(spatial) == 2:
                img = self.grayscale(img)
            elif len(spatial) == 3 and img.shape[0] == 1:
                img = img.reshape(1, *spatial).float()
            else:
                raise ValueError(f"cannot segment {source}: it is {len(spatial) + (img.shape[0] > 1)}-D ("
                                 f"{img.shape[0]} image(s) of shape {tuple(spatial)}); only 2-D images and 3-D "
                                 f"volumes are segmented: extract one image or volume first")
            if not torch.isfinite(img).all():
                raise ValueError(f"cannot segment {source}: it contains NaN or infinite pixel values")
            low, high = float(img.min()), float(img.max())
            if low == high:
                raise ValueError(f"cannot segment {source}: every pixel has the value {low:g}, there is nothing "
                                 f"to segment")
            d[key] = img
        return d

    @staticmethod
    def _check_header(header: InputHeader) -> None:
        """Refuse, before decoding, what the header shows cannot be segmented as one image or volume."""
        if header.frames > 1 and header.kind == "picture":
            raise Unreadable(f"it is a {header.format} of {header.frames} pages: save the page to segment as a "
                              f"picture of its own")
        if header.kind == "DICOM" and header.photometric == "PALETTE COLOR":
            raise Unreadable("PALETTE COLOR DICOM (pixel values index a colour table) is not supported: export it "
                              "as MONOCHROME2 or RGB")
        if header.kind == "DICOM" and header.samples > 1 and header.frames > 1:
            raise Unreadable(f"multi-frame colour DICOM ({header.frames} frames of {header.samples} samples) is not "
                              f"supported: export one frame, or gray frames")

    @staticmethod
    def _dicom_colour(img: torch.Tensor, header: InputHeader) -> torch.Tensor:
        """MONAI's DICOM reader leaves colour samples as a last spatial axis, ``(1, X, Y, 3)``: make them channels."""
        if header.samples > 1 and img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == header.samples:
            img = img[0].movedim(-1, 0)  # (3, X, Y), merged to gray below like a colour picture
            if hasattr(img, "meta"):
                img.meta["spatial_shape"] = tuple(img.shape[1:])
        return img
