"""The explanation maps of a run as the module shows them: names, colour maps, and the maps on the input's grid.

``causalclipseg predict --explain`` (and the worker, for a request with ``explain``) writes the lesion probability
and, for a model with a causal module, the causal mask (what that module kept, averaged over its levels) as float32
NIfTI in [0, 1] on the input's grid (:attr:`.request.LocalJob.explanation_files`); a MONAI Label server running
``monailabel_app`` answers each map its model gives to a request with its ``result_map`` (:data:`RESULT_MAPS`). The
module reads them unthresholded and shows each as a scalar volume named after the prompt, over the input in the
slice views' foreground, with a colour table that Slicer builds in (so also in ``slicer-core``). The probability is
windowed 0..1, values below :attr:`MapStyle.lower_threshold` transparent, so the input shows through where it is ~0.
The causal mask is windowed on its own range: a CausalCLIPSeg model's masks spanned about 0.42-0.65 over a whole
X-ray, which a 0..1 window would show as one flat colour. The shipped model has no causal module (it segments better
without one: the project's README, "Does the causal intervention pay?"), so its runs give the probability alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .segments import segment_name
from .volume_io import read_on_grid

__all__ = ["MapStyle", "STYLES", "RESULT_MAPS", "MODEL_DEPENDENT", "FOREGROUND_OPACITY", "explanation_name",
           "style_display", "read_explanations"]


@dataclass(frozen=True)
class MapStyle:
    """How one kind of map is displayed."""

    color_node_id: str  # a colour table Slicer builds in, by its node ID
    window: tuple[float, float] | None = (0.0, 1.0)  # the display range; None: the map's own minimum and maximum
    lower_threshold: float | None = 0.05  # values below are transparent over the input; None: none are

    def window_for(self, values: np.ndarray) -> tuple[float, float]:
        """The display range for ``values`` (a flat map gets a range of width 1e-6 around its value)."""
        if self.window is not None:
            return self.window
        low, high = float(values.min()), float(values.max())
        return low, max(high, low + 1e-6)


# By kind, in the order the maps are made; the first is shown over the input.
STYLES: dict[str, MapStyle] = {
    "probability": MapStyle("vtkMRMLColorTableNodeIron"),
    "causal mask": MapStyle("vtkMRMLColorTableNodeOcean", window=None, lower_threshold=None),
}
# By kind, the MONAI Label app's ``result_map`` request parameter for the map (``monailabel_app/lib/infers.py``).
RESULT_MAPS = {"probability": "probability", "causal mask": "causal_mask"}
# The kinds only a model with a causal module gives: a run without them is complete.
MODEL_DEPENDENT = ("causal mask",)
FOREGROUND_OPACITY = 0.5  # of the map over the input in the slice views


def explanation_name(prompt: str, kind: str) -> str:
    """The volume's name: the segment's name (:func:`.segments.segment_name`) and the kind, e.g.
    ``lesion in the left lung (probability)``.

    Raises:
        ValueError: for an empty prompt or an unknown kind.
    """
    if kind not in STYLES:
        raise ValueError(f"kind must be one of {', '.join(STYLES)}, got {kind!r}")
    return f"{segment_name(prompt)} ({kind})"


def style_display(display, kind: str, values: np.ndarray) -> tuple[float, float]:
    """Display a map as ``STYLES[kind]`` says, on its ``vtkMRMLScalarVolumeDisplayNode``; returns the window used.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind not in STYLES:
        raise ValueError(f"kind must be one of {', '.join(STYLES)}, got {kind!r}")
    style = STYLES[kind]
    low, high = style.window_for(values)
    display.SetAndObserveColorNodeID(style.color_node_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    display.AutoThresholdOff()
    if style.lower_threshold is not None:
        display.SetThreshold(style.lower_threshold, max(high, float(values.max())))
    display.SetApplyThreshold(style.lower_threshold is not None)
    return low, high


def read_explanations(files: Mapping[str, str | os.PathLike], shape_kji: tuple[int, int, int],
                      ijk_to_ras: np.ndarray, allow_resample: bool = False) -> dict[str, np.ndarray]:
    """Each map of ``files`` (kind -> path, as :attr:`.request.LocalJob.explanation_files`) as a float32 (K, J, I)
    array on the input's grid, values as written (not thresholded). A map of :data:`MODEL_DEPENDENT` that was not
    written is left out (the model has no causal module).

    Args:
        allow_resample: bring a map on another grid onto the input's (nearest neighbour; a server may reorient)
            instead of failing.

    Raises:
        FileNotFoundError: if a map every model gives (the probability) was not written.
        GridMismatchError: if a map is not on the input's grid and ``allow_resample`` is false (the package writes
            them on it: a bug).
        ValueError: for an unknown kind or an unreadable file.
    """
    maps = {}
    for kind, path in files.items():
        if kind not in STYLES:
            raise ValueError(f"kind must be one of {', '.join(STYLES)}, got {kind!r}")
        if not os.path.isfile(path):
            if kind in MODEL_DEPENDENT:
                continue
            raise FileNotFoundError(f"the {kind} map was asked for but not written: {path}")
        maps[kind] = read_on_grid(path, shape_kji, ijk_to_ras, allow_resample).astype(np.float32, copy=False)
    return maps
