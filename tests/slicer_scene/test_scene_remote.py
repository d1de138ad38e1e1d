"""The remote backend from the scene: the module's Logic (its standard-library MONAI Label client, in Slicer's Python)
against a real MONAI Label server running ``monailabel_app/`` in the project's environment on a free loopback port.

The server (``conftest.MonaiLabelServer``) is started at the beginning of the session and serves the bundle's weights,
the package's shipped ones: the segment must be the local command's mask for the same volume (one model, one
inference path).
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed here: see tests/slicer_scene/run.sh")

import scene  # noqa: E402

MODEL = "causalclipseg"


def test_remote_backend_segments_the_oblique_volume_as_the_local_command(module, monailabel_server: str,
                                                                         reference_masks) -> None:
    from TextPromptSegmentationLib import monailabel_client

    assert monailabel_client.available_models(monailabel_client.info(monailabel_server)) == [MODEL]
    logic = module.TextPromptSegmentationLogic()
    logic.pythonExecutable = "/no/python/is/needed/for/the/remote/backend"
    volume = slicer.util.addVolumeFromArray(scene.oblique_array(), ijkToRAS=scene.oblique_ijk_to_ras(), name="oblique")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    name = logic.process(volume, segmentation, scene.request(), backend=module.REMOTE, serverUrl=monailabel_server,
                         serverModel=MODEL, timeout=scene.MODEL_TIMEOUT)
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
    scene.assert_segment_is_the_reference(volume, segmentation, segment_id, reference_masks.mask_on("oblique", volume))


def test_remote_explanations_are_the_local_ones(module, monailabel_server: str, model_python) -> None:
    """*Show explanations* with the remote backend: the maps the served model gives (the shipped one: the
    probability alone; one ``result_map`` request each) come from the server as the same volumes the local backend
    makes: the same names, grid, styles and values, and the probability thresholded is the segment."""
    from TextPromptSegmentationLib import explanations

    volume = slicer.util.addVolumeFromArray(scene.oblique_array(), ijkToRAS=scene.oblique_ijk_to_ras(), name="oblique")
    maps = {}
    for backend in (module.REMOTE, module.LOCAL):
        logic = module.TextPromptSegmentationLogic()
        logic.pythonExecutable = model_python.executable
        lines = []
        logic.logCallback = lines.append
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        name = logic.process(volume, segmentation, scene.request(explain=True), backend=backend,
                             serverUrl=monailabel_server, serverModel=MODEL, timeout=scene.MODEL_TIMEOUT)
        nodes = logic.explanationVolumes
        assert [node.GetName() for node in nodes] == [explanations.explanation_name(scene.PROMPT, "probability")]
        for kind, node in zip(["probability"], nodes):
            values = slicer.util.arrayFromVolume(node).copy()
            np.testing.assert_allclose(scene.ijk_to_ras(node), scene.ijk_to_ras(volume), atol=1e-9)
            assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
            assert node.GetDisplayNode().GetColorNodeID() == explanations.STYLES[kind].color_node_id
            maps[backend, kind] = values
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        np.testing.assert_array_equal(mask > 0, maps[backend, "probability"] > scene.request().threshold)
        if backend == module.REMOTE:
            assert any("one request each" in line for line in lines), lines
    np.testing.assert_allclose(maps[module.REMOTE, "probability"], maps[module.LOCAL, "probability"], atol=1e-5)


def test_remote_errors_are_one_readable_line(module, monailabel_server: str) -> None:
    """A model the server does not have, and a server that is not there."""
    logic = module.TextPromptSegmentationLogic()
    volume = scene.add_png_volume(scene.SAMPLE_XRAY)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(Exception) as error:  # noqa: B017 - the message is what the user gets
        logic.process(volume, segmentation, scene.request(), backend=module.REMOTE, serverUrl=monailabel_server,
                      serverModel="nosuchmodel", timeout=60)
    scene.assert_one_readable_line(error.value, "nosuchmodel", "HTTP 404")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there
    with pytest.raises(Exception) as error:  # noqa: B017
        logic.process(volume, segmentation, scene.request(), backend=module.REMOTE, serverUrl=closed, timeout=60)
    scene.assert_one_readable_line(error.value, "connection refused")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0
