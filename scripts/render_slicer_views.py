"""Pictures from 3D Slicer's own slice view, rendered offscreen: what the Text Prompt Segmentation module shows.

Runs in its own environment, as Slicer's Python is separate from the model's: Slicer's core and its slice views
come from ``trame-slicer[standalone]`` (which pins ``slicer-core``), rendered through EGL without an X server. The
model runs in the project's environment, called as the module calls it: the volume is written from the scene by
Slicer's storage node, ``causalclipseg predict --explain`` segments it, and the mask and the explanation maps it
wrote (the probability; the causal mask too for a model with a causal module) are read back into the scene by
Slicer's storage nodes, on the volume's exact grid.

Two scenes:

* a QaTa-COV19 valid X-ray (the one in ``bundle/sample_data``), put in the scene as Slicer's PNG reader does (the
  patient's left is on the screen's right), with the prompt's segment (``xray_segment.png``); the same view with
  the probability over it as the module shows it, the segment's outline on top (``xray_probability.png``); and,
  for a model with a causal module (``--model tiny --checkpoint ...``; the shipped model has none), with the
  causal mask as the foreground (``xray_causal_mask.png``);
* an oblique volume (the X-ray stacked into 5 slices, rotated 20 degrees about S, 0.8 x 0.8 x 2.5 mm), shown in
  the axial view that Slicer reslices it into, with its segment.

Usage (from the repository root)::

    python3 -m venv /tmp/render-venv && /tmp/render-venv/bin/pip install "trame-slicer[standalone]==2.0.0" pillow
    /tmp/render-venv/bin/python scripts/render_slicer_views.py --python .venv/bin/python

Writes ``slicer_extension/Screenshots/*.png`` (``--output-dir``) and prints each map's value range.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import vtk
from PIL import Image
from vtkmodules.util import numpy_support

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slicer_extension" / "TextPromptSegmentation"))
from TextPromptSegmentationLib import explanations, segments  # noqa: E402  (the module's names, colours, styles)

# The QaTa-COV19 valid X-ray shipped with its attribution and licence in bundle/sample_data (pictures of other
# QaTa images would be the dataset in the repository). Its caption says "lower right lung", the viewer's side: the
# patient's left.
DEFAULT_IMAGE = ROOT / "bundle" / "sample_data" / "sub-s11251_ses-e26227_run-1_bp-chest_vp-ap_cr.png"
DEFAULT_PROMPT = "Unilateral pulmonary infection, one infected area, lower left lung."
# By kind (``explanations.STYLES``), the suffix of the map ``causalclipseg predict --explain`` writes.
EXPLANATION_SUFFIXES = {"probability": "_probability.nii.gz", "causal mask": "_causal_mask.nii.gz"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="the project's interpreter (has causalclipseg)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="an 8-bit grey X-ray PNG")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt (the patient's sides)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "slicer_extension" / "Screenshots")
    parser.add_argument("--size", type=int, default=448, help="view size in pixels")
    parser.add_argument("--model", default=None,
                        help="model variant for causalclipseg predict; default: the shipped model (no causal module)")
    parser.add_argument("--checkpoint", default=None, help="its weights; default: the ones shipped for it")
    return parser.parse_args(argv)


def ijk_to_ras(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            out.SetElement(row, column, float(matrix[row, column]))
    return out


def add_volume(scene, name: str, array: np.ndarray, matrix: np.ndarray):
    """A scalar volume node from a (K, J, I) array, as ``slicer.util.addVolumeFromArray`` makes one."""
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(ijk_to_ras(matrix))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def save_volume(node, path: Path) -> None:
    """Write with Slicer's own volume storage node (what Slicer's Save does)."""
    from slicer import vtkMRMLVolumeArchetypeStorageNode

    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(node):
        raise RuntimeError(f"Slicer could not write {path}")


def predict(python: str, volume: Path, prompt: str, output_dir: Path, model: str | None = None,
            checkpoint: str | None = None) -> tuple[Path, dict[str, Path]]:
    """``causalclipseg predict --explain`` in the project's environment; the mask file and the explanation maps it
    wrote, by kind (the causal mask only for a model with a causal module)."""
    command = [python, "-m", "causalclipseg.cli", "predict", str(volume), "--prompt", prompt, "--explain",
               "--output-dir", str(output_dir)]
    if model is not None:
        command += ["--model", model]
    if checkpoint is not None:
        command += ["--checkpoint", checkpoint]
    done = subprocess.run(command)
    if done.returncode:
        sys.exit(f"error: causalclipseg predict on {volume.name} failed (status {done.returncode}); see above")
    stem = volume.name.removesuffix(".nii.gz")
    mask_file = output_dir / f"{stem}_mask.nii.gz"
    maps = {kind: output_dir / f"{stem}{suffix}" for kind, suffix in EXPLANATION_SUFFIXES.items()}
    maps = {kind: path for kind, path in maps.items() if path.is_file()}
    if not mask_file.is_file() or "probability" not in maps:
        sys.exit(f"error: causalclipseg predict on {volume.name} wrote no mask or no probability in {output_dir}")
    return mask_file, maps


class SliceViewRenderer:
    """One offscreen axial slice view of a trame-slicer application."""

    def __init__(self, size: int) -> None:
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition, ViewProps, ViewType

        self.app = SlicerApp()
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.view = self.app.view_manager.create_view(ViewLayoutDefinition(
            singleton_tag="Red", view_type=ViewType.SLICE_VIEW, properties=ViewProps(orientation="Axial")))
        self.view.render_window().SetSize(size, size)
        self.view.interactor().UpdateSize(size, size)

    @property
    def scene(self):
        return self.app.scene

    def load_segment(self, mask_file: Path, prompt: str):
        """The mask file as one segment named and coloured as the module names and colours it."""
        node = self.app.segmentation_editor.load_segmentation_from_file(str(mask_file))
        segmentation = node.GetSegmentation()
        if segmentation.GetNumberOfSegments() != 1:
            raise RuntimeError(f"{mask_file}: expected one segment, got {segmentation.GetNumberOfSegments()}")
        segment = segmentation.GetNthSegment(0)
        segment.SetName(segments.segment_name(prompt))
        segment.SetColor(*segments.segment_color(prompt))
        display = node.GetDisplayNode()
        display.SetOpacity2DFill(0.35)
        display.SetOpacity2DOutline(1.0)
        return node

    def load_map(self, file: Path, kind: str) -> tuple[object, tuple[float, float]]:
        """An explanation map displayed as the module displays it (``explanations.STYLES[kind]``); its value range."""
        (node,) = self.app.io_manager.load_volumes(str(file))
        values = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
        explanations.style_display(node.GetDisplayNode(), kind, values)
        return node, (float(values.min()), float(values.max()))

    def show(self, background, foreground=None, opacity: float = 0.5) -> None:
        self.app.display_manager.show_volume_in_slice_background(background)
        self.app.display_manager.show_volume_in_slice_foreground(foreground)
        self.view.set_foreground_opacity(opacity if foreground is not None else 0.0)
        self.view.fit_view_to_content()

    def write(self, path: Path) -> None:
        self.view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.view.render_window())
        grab.ReadFrontBufferOff()
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
        print(f"wrote {path}")


def oblique_matrix() -> np.ndarray:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([-0.8, -0.8, 2.5])  # the PNG reader's flips, then 0.8 mm pixels
    matrix[:3, 3] = [40.0, 60.0, -5.0]
    return matrix


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.image.is_file():
        sys.exit(f"error: {args.image}: no such X-ray")
    xray = np.asarray(Image.open(args.image).convert("L"))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        renderer = SliceViewRenderer(args.size)
        # Slicer's PNG reader: columns are I, rows are J, IJK-to-RAS diag(-1, -1, 1).
        volume = add_volume(renderer.scene, "xray", xray[None].astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]))
        save_volume(volume, work / "xray.nii.gz")
        mask_file, maps = predict(args.python, work / "xray.nii.gz", args.prompt, work / "out", args.model,
                                  args.checkpoint)
        segmentation = renderer.load_segment(mask_file, args.prompt)
        renderer.show(volume)
        renderer.write(args.output_dir / "xray_segment.png")
        segmentation.GetDisplayNode().SetOpacity2DFill(0.0)  # the outline only, over the maps
        probability, (low, high) = renderer.load_map(maps["probability"], "probability")
        print(f"probability values {low:.3f} .. {high:.3f}")
        renderer.show(volume, probability, opacity=explanations.FOREGROUND_OPACITY)  # as the module shows it
        renderer.write(args.output_dir / "xray_probability.png")
        if "causal mask" in maps:
            causal, (low, high) = renderer.load_map(maps["causal mask"], "causal mask")
            print(f"causal mask values {low:.3f} .. {high:.3f}")
            renderer.show(volume, causal, opacity=0.6)
            renderer.write(args.output_dir / "xray_causal_mask.png")
        else:
            print("no causal mask: the model has no causal module")
        segmentation.GetDisplayNode().SetVisibility(False)

        # One application and view for both scenes: a second trame-slicer application in the same process
        # renders its layers without lookup tables.
        stack = np.stack([xray] * 5).astype(np.int16)
        volume = add_volume(renderer.scene, "oblique", stack, oblique_matrix())
        save_volume(volume, work / "oblique.nii.gz")
        mask_file, _ = predict(args.python, work / "oblique.nii.gz", args.prompt, work / "out", args.model,
                               args.checkpoint)
        renderer.load_segment(mask_file, args.prompt)
        renderer.show(volume)
        renderer.write(args.output_dir / "oblique_volume_segment.png")
        vtk.vtkObject.GlobalWarningDisplayOff()  # the pipelines complain while the scene is torn down
    return 0


if __name__ == "__main__":
    sys.exit(main())
