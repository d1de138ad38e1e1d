"""TextPromptSegmentation: segment what a text prompt describes (CausalCLIPSeg) in 3D Slicer.

Slicer's process never imports torch: the local backend runs the package in a subprocess (one ``causalclipseg
worker`` kept between runs, or ``causalclipseg predict`` per run), the remote backend asks a MONAI Label server.
Everything that does not need Slicer lives in ``TextPromptSegmentationLib`` and is tested with pytest outside Slicer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from TextPromptSegmentationLib import dependencies, explanations, monailabel_client, segments, volume_io, worker
from TextPromptSegmentationLib.request import (
    DEVICES,
    EXAMPLE_PROMPTS,
    PROMPT_SIDES,
    SegmentationRequest,
    build_predict_command,
    child_environment,
    prepare_job,
)
from TextPromptSegmentationLib.runner import BackgroundCall, ProcessRunner, RunState, RunUpdate, parse_progress

LOCAL, REMOTE = "local", "remote"
SETTINGS = "TextPromptSegmentation/"
DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_SERVER_MODEL = "causalclipseg"
DEFAULT_PACKAGE = "causalclipseg"


#
# TextPromptSegmentation
#


class TextPromptSegmentation(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent: qt.QWidget) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Text Prompt Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["causalclipseg developers"]
        self.parent.helpText = (
            "Segment what a text prompt describes (e.g. a lesion and where it is) with CausalCLIPSeg, on this "
            "computer or on a MONAI Label server. CT/MR volumes are segmented slice by slice; single-slice "
            "volumes (X-rays) as pictures. The result is a segment named after the prompt, on the input's grid.<br>"
            "<b>Left and right</b> in the prompt are the patient's sides, as clinicians say: in Slicer's default "
            "views the patient's left lung is on the screen's right. For a prompt that names the screen's sides, "
            "such as a QaTa-COV19 caption as written, set <i>Left/right mean</i> to the screen's (viewer).")
        self.parent.acknowledgementText = (
            "CausalCLIPSeg: Chen et al., MICCAI 2024 (LNCS 15003, pp. 77-87). Uses MONAI and open_clip.")


#
# TextPromptSegmentationWidget
#


class TextPromptSegmentationWidget(ScriptedLoadableModuleWidget):
    """The panel: inputs, backend, Segment/Cancel, progress and log. The layout is in Resources/UI."""

    def __init__(self, parent: qt.QWidget | None = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic: TextPromptSegmentationLogic | None = None
        self.timer: qt.QTimer | None = None

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TextPromptSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TextPromptSegmentationLogic()
        self.logic.logCallback = self.appendLog

        self.ui.examplePromptComboBox.addItem("Pick an example prompt...")
        for prompt in EXAMPLE_PROMPTS:
            self.ui.examplePromptComboBox.addItem(prompt)
        self.ui.backendComboBox.addItem("This computer (local bundle)", LOCAL)
        self.ui.backendComboBox.addItem("MONAI Label server", REMOTE)
        for device, label in zip(DEVICES, ("Auto (GPU when present)", "CPU", "GPU (CUDA)"), strict=True):
            self.ui.deviceComboBox.addItem(label, device)
        for side, label in zip(PROMPT_SIDES, ("The patient's sides (as clinicians say)",
                                              "The screen's sides (viewer, as QaTa-COV19 captions)"), strict=True):
            self.ui.promptSideComboBox.addItem(label, side)

        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS + "ServerUrl", DEFAULT_SERVER)
        self.ui.serverModelLineEdit.text = settings.value(SETTINGS + "ServerModel", DEFAULT_SERVER_MODEL)
        self.ui.packageLineEdit.text = settings.value(SETTINGS + "Package", DEFAULT_PACKAGE)
        self.ui.pythonPathLineEdit.currentPath = settings.value(SETTINGS + "Python", "")
        self.ui.checkpointPathLineEdit.currentPath = settings.value(SETTINGS + "Checkpoint", "")
        self.ui.modelLineEdit.text = settings.value(SETTINGS + "Model", "")
        self.ui.modelConfigPathLineEdit.currentPath = settings.value(SETTINGS + "ModelConfig", "")
        self.ui.backendComboBox.currentIndex = max(0, self.ui.backendComboBox.findData(
            settings.value(SETTINGS + "Backend", LOCAL)))
        self.ui.deviceComboBox.currentIndex = max(0, self.ui.deviceComboBox.findData(
            settings.value(SETTINGS + "Device", "auto")))
        self.ui.promptSideComboBox.currentIndex = max(0, self.ui.promptSideComboBox.findData(
            settings.value(SETTINGS + "PromptSide", "patient")))
        self.ui.explainCheckBox.checked = str(settings.value(SETTINGS + "Explain", "false")).lower() == "true"
        self.ui.flipTtaCheckBox.checked = str(settings.value(SETTINGS + "FlipTta", "false")).lower() == "true"

        self.ui.examplePromptComboBox.connect("activated(int)", self.onExamplePrompt)
        self.ui.backendComboBox.connect("currentIndexChanged(int)", self.updateButtons)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.promptTextEdit.connect("textChanged()", self.updateButtons)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)

        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.ui.progressBar.setVisible(False)
        self.updateButtons()

    def cleanup(self) -> None:
        """Stop a running segmentation and the model process when the module is closed."""
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.cancel()
        worker.stop_shared_worker()

    @contextlib.contextmanager
    def errorsInDialog(self, title: str) -> Iterator[None]:
        """Show an exception as one readable line in a dialog (traceback under Details and in the log)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - every failure goes to the user, none crashes the panel
            message = " ".join(str(err).split()) or type(err).__name__
            logging.error(traceback.format_exc())
            self.appendLog(f"{title} {message}")
            slicer.util.errorDisplay(f"{title} {message}", detailedText=traceback.format_exc())

    def appendLog(self, text: str) -> None:
        """Add a line to the log box."""
        self.ui.logTextEdit.appendPlainText(text)

    def prompt(self) -> str:
        """The prompt as typed."""
        return self.ui.promptTextEdit.toPlainText().strip()

    def backend(self) -> str:
        """``local`` or ``remote``."""
        return self.ui.backendComboBox.currentData

    def updateButtons(self, *_: object) -> None:
        """Enable what makes sense in the current state."""
        running = self.logic is not None and self.logic.running
        remote = self.backend() == REMOTE
        self.ui.serverUrlLineEdit.enabled = remote and not running
        self.ui.serverModelLineEdit.enabled = remote and not running
        self.ui.pythonPathLineEdit.enabled = not remote and not running
        self.ui.checkpointPathLineEdit.enabled = not remote and not running
        self.ui.modelLineEdit.enabled = not remote and not running
        self.ui.modelConfigPathLineEdit.enabled = not remote and not running
        for widget in (self.ui.inputVolumeSelector, self.ui.promptTextEdit, self.ui.examplePromptComboBox,
                       self.ui.promptSideComboBox, self.ui.backendComboBox, self.ui.deviceComboBox,
                       self.ui.thresholdSliderWidget, self.ui.outputSegmentationSelector, self.ui.installButton,
                       self.ui.explainCheckBox, self.ui.flipTtaCheckBox):
            widget.enabled = not running
        if running:
            self.ui.segmentButton.text = "Cancel"
            self.ui.segmentButton.toolTip = "Stop the segmentation (the whole process tree is ended)"
            self.ui.segmentButton.enabled = True
            return
        self.ui.segmentButton.text = "Segment"
        ready = self.ui.inputVolumeSelector.currentNode() is not None and bool(self.prompt())
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = ("Segment what the prompt describes" if ready
                                         else "Select an input volume and type a prompt")

    def onExamplePrompt(self, index: int) -> None:
        """Copy the picked example into the prompt box."""
        if index > 0:
            self.ui.promptTextEdit.setPlainText(self.ui.examplePromptComboBox.itemText(index))
        self.ui.examplePromptComboBox.setCurrentIndex(0)

    def saveSettings(self) -> None:
        """Remember the choices for the next session."""
        settings = qt.QSettings()
        settings.setValue(SETTINGS + "ServerUrl", self.ui.serverUrlLineEdit.text)
        settings.setValue(SETTINGS + "ServerModel", self.ui.serverModelLineEdit.text)
        settings.setValue(SETTINGS + "Package", self.ui.packageLineEdit.text)
        settings.setValue(SETTINGS + "Python", self.ui.pythonPathLineEdit.currentPath)
        settings.setValue(SETTINGS + "Checkpoint", self.ui.checkpointPathLineEdit.currentPath)
        settings.setValue(SETTINGS + "Model", self.ui.modelLineEdit.text)
        settings.setValue(SETTINGS + "ModelConfig", self.ui.modelConfigPathLineEdit.currentPath)
        settings.setValue(SETTINGS + "Backend", self.backend())
        settings.setValue(SETTINGS + "Device", self.ui.deviceComboBox.currentData)
        settings.setValue(SETTINGS + "PromptSide", self.ui.promptSideComboBox.currentData)
        settings.setValue(SETTINGS + "Explain", "true" if self.ui.explainCheckBox.checked else "false")
        settings.setValue(SETTINGS + "FlipTta", "true" if self.ui.flipTtaCheckBox.checked else "false")

    def configureLogic(self) -> None:
        """Hand the advanced settings to the logic (the worker's idle timeout is a setting without a widget)."""
        self.logic.pythonExecutable = self.ui.pythonPathLineEdit.currentPath.strip() or None
        self.logic.packageRequirement = self.ui.packageLineEdit.text.strip() or DEFAULT_PACKAGE
        idle = qt.QSettings().value(SETTINGS + "WorkerIdleTimeout", worker.DEFAULT_IDLE_TIMEOUT)
        try:
            self.logic.workerIdleTimeout = float(idle)
        except (TypeError, ValueError) as err:
            raise ValueError(f"the setting {SETTINGS}WorkerIdleTimeout must be seconds (0: no model process kept), "
                             f"got {idle!r}") from err

    def ensureDependencies(self, always_ask: bool = False) -> bool:
        """Install what is missing after the user agrees; ``False`` if they decline."""
        missing = self.logic.missingRequirements(self.backend())
        if not missing:
            if always_ask:
                slicer.util.infoDisplay("Everything this module needs is installed.")
            return True
        if not slicer.util.confirmOkCancelDisplay(
                f"Text Prompt Segmentation needs these Python packages: {', '.join(missing)}.\n\n"
                "Install them into Slicer's Python now? This downloads several hundred MB (PyTorch) and takes a few "
                "minutes. Packages that Slicer ships (numpy, VTK, ...) are kept at their versions.",
                windowTitle="Install dependencies"):
            self.appendLog("Installation declined; nothing was changed.")
            return False
        with slicer.util.WaitCursor():
            self.appendLog(f"Installing {', '.join(missing)} ...")
            self.logic.installRequirements(missing)
        self.appendLog("Installation finished.")
        return True

    def onInstallButton(self) -> None:
        """Check and install dependencies on request."""
        with self.errorsInDialog("Installation failed:"):
            self.configureLogic()
            self.ensureDependencies(always_ask=True)

    def onSegmentButton(self) -> None:
        """Start a segmentation, or cancel the running one."""
        if self.logic.running:
            self.logic.cancel()
            self.appendLog("Cancelled.")
            self.finishRun("Cancelled.")
            return
        with self.errorsInDialog("Cannot start the segmentation:"):
            self.saveSettings()
            self.configureLogic()
            if not self.ensureDependencies():
                return
            self.ui.logTextEdit.clear()
            request = SegmentationRequest(
                prompt=self.prompt(), device=self.ui.deviceComboBox.currentData,
                threshold=float(self.ui.thresholdSliderWidget.value),
                checkpoint=self.ui.checkpointPathLineEdit.currentPath.strip() or None,
                model=self.ui.modelLineEdit.text.strip() or None,
                model_config=self.ui.modelConfigPathLineEdit.currentPath.strip() or None,
                prompt_side=self.ui.promptSideComboBox.currentData, explain=bool(self.ui.explainCheckBox.checked),
                flip_tta=bool(self.ui.flipTtaCheckBox.checked))
            if self.ui.outputSegmentationSelector.currentNode() is None:
                self.ui.outputSegmentationSelector.addNode()
            self.logic.start(self.ui.inputVolumeSelector.currentNode(), request, self.backend(),
                             self.ui.serverUrlLineEdit.text, self.ui.serverModelLineEdit.text)
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setRange(0, 0)  # busy until a percentage arrives
            self.ui.statusLabel.text = "Segmenting..."
            self.timer.start()
        self.updateButtons()

    def onPoll(self) -> None:
        """Timer tick: show new output and progress; finish when the run has ended."""
        status = "Failed: see the log."
        with self.errorsInDialog("Segmentation failed:"):
            update = self.logic.poll()
            for line in update.lines:
                if parse_progress(line) is None:
                    self.appendLog(line)
            if update.progress is not None:
                self.ui.progressBar.setRange(0, 100)
                self.ui.progressBar.value = int(round(100 * update.progress))
            if not update.state.done:
                return
            self.timer.stop()
            if update.state is RunState.CANCELLED:
                status = "Cancelled."
            else:
                status = f"Done: segment '{self.logic.finish(self.ui.outputSegmentationSelector.currentNode())}'."
                self.showExplanations()
        self.finishRun(status)

    def showExplanations(self) -> None:
        """Show the first explanation map of the last run over the input in the slice views."""
        volumes = self.logic.explanationVolumes
        if not volumes:
            return
        slicer.util.setSliceViewerLayers(background=self.ui.inputVolumeSelector.currentNode(), foreground=volumes[0],
                                         foregroundOpacity=explanations.FOREGROUND_OPACITY)
        others = ", ".join(f"'{v.GetName()}'" for v in volumes[1:])
        self.appendLog(f"Shown over the input: '{volumes[0].GetName()}'."
                       + (f" Also in the scene: {others} (choose it as a slice view's foreground)." if others else ""))

    def finishRun(self, status: str) -> None:
        """Put the panel back into its idle state, showing ``status``."""
        self.timer.stop()
        self.logic.cancel()  # a no-op unless polling itself failed while the run went on
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = status
        self.updateButtons()


#
# TextPromptSegmentationLogic
#


class TextPromptSegmentationLogic(ScriptedLoadableModuleLogic):
    """Runs a segmentation without a GUI: start, poll, cancel, finish (or :meth:`process` in one call).

    Attributes:
        logCallback: called with each log line; ``None`` logs with ``logging``.
        pythonExecutable: interpreter with the ``causalclipseg`` package; ``None`` uses Slicer's own.
        packageRequirement: what pip installs for the local backend (a name, a wheel or a source folder).
        workerIdleTimeout: seconds the local backend's model process stays loaded after a run (one per session, see
            ``TextPromptSegmentationLib.worker``); 0 runs ``causalclipseg predict`` in a new process each time.
        explanationVolumes: the scalar volumes :meth:`finish` made for a request with ``explain`` (probability
            first, then the causal mask of a model with a causal module); empty otherwise.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback: Callable[[str], None] | None = None
        self.pythonExecutable: str | None = None
        self.packageRequirement = DEFAULT_PACKAGE
        self.workerIdleTimeout = worker.DEFAULT_IDLE_TIMEOUT
        self.explanationVolumes: list[slicer.vtkMRMLScalarVolumeNode] = []
        self._run: ProcessRunner | worker.WorkerRun | BackgroundCall | None = None
        self._job = None
        self._backend = LOCAL
        self._input: slicer.vtkMRMLScalarVolumeNode | None = None
        self._grid: tuple[tuple[int, int, int], np.ndarray] | None = None
        self._prompt = ""
        self._explain = False

    def log(self, text: str) -> None:
        """Report a line."""
        if self.logCallback is not None:
            self.logCallback(text)
        else:
            logging.info(text)

    @property
    def running(self) -> bool:
        """Whether a segmentation is under way."""
        return self._run is not None and not self._run.state.done and self._run.state is not RunState.NOT_STARTED

    # --- dependencies -------------------------------------------------------------------------------------

    def missingRequirements(self, backend: str) -> list[str]:
        """pip requirements missing from Slicer's Python for ``backend`` (nothing is imported to check)."""
        needed = dict(dependencies.IO_REQUIREMENTS)
        if backend == LOCAL and not self.pythonExecutable:
            needed[dependencies.PACKAGE_MODULE] = self.packageRequirement
        return dependencies.missing_requirements(needed)

    def installRequirements(self, requirements: list[str]) -> None:
        """pip install into Slicer's Python, pinning the packages Slicer ships (see ``dependencies``)."""
        constraints = dependencies.write_constraints(
            Path(slicer.app.temporaryPath) / "TextPromptSegmentation" / "constraints.txt")
        slicer.util.pip_install(dependencies.pip_install_arguments(requirements, constraints))

    def interpreter(self) -> tuple[str, bool]:
        """The Python that runs the package and whether it is Slicer's own.

        Raises:
            FileNotFoundError: if the configured interpreter or Slicer's PythonSlicer cannot be found.
        """
        if self.pythonExecutable:
            if not os.path.isfile(self.pythonExecutable):
                raise FileNotFoundError(f"the Python interpreter {self.pythonExecutable} does not exist")
            return self.pythonExecutable, False
        python = shutil.which("PythonSlicer")
        if python is None:
            raise FileNotFoundError("Slicer's PythonSlicer was not found; set a Python interpreter under Advanced")
        return python, True

    # --- one segmentation ---------------------------------------------------------------------------------

    @staticmethod
    def volumeGrid(volumeNode: slicer.vtkMRMLScalarVolumeNode) -> tuple[np.ndarray, np.ndarray]:
        """The scalar (K, J, I) array and the IJK-to-RAS matrix of a volume node (vector volumes averaged)."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        array = volume_io.to_scalar(slicer.util.arrayFromVolume(volumeNode))
        return array, slicer.util.arrayFromVTKMatrix(matrix)

    def start(self, inputVolume: slicer.vtkMRMLScalarVolumeNode, request: SegmentationRequest, backend: str = LOCAL,
              serverUrl: str = DEFAULT_SERVER, serverModel: str = DEFAULT_SERVER_MODEL) -> None:
        """Write the job and start it in the background.

        Raises:
            ValueError: without an input volume, for an unknown backend, or a running segmentation.
            FileNotFoundError: if the interpreter cannot be found.
        """
        if self.running:
            raise ValueError("a segmentation is already running; cancel it first")
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("select an input volume that holds an image")
        if backend not in (LOCAL, REMOTE):
            raise ValueError(f"backend must be {LOCAL!r} or {REMOTE!r}, got {backend!r}")
        array, matrix = self.volumeGrid(inputVolume)
        folder = tempfile.mkdtemp(prefix="TextPromptSegmentation-", dir=slicer.app.temporaryPath)
        self._job = prepare_job(folder, request, array, matrix)
        self._grid, self._input, self._prompt, self._backend = (array.shape, matrix), inputVolume, request.prompt, \
            backend
        self._explain, self.explanationVolumes = request.explain, []
        self.log(f"Input {inputVolume.GetName()}: {array.shape[2]} x {array.shape[1]} x {array.shape[0]} voxels; "
                 f"job folder {folder}")
        self.log(f"'Left' and 'right' in the prompt: the {request.prompt_side}'s sides")
        if backend == LOCAL:
            python, own = self.interpreter()
            env = child_environment(os.environ, own)
            if self.workerIdleTimeout > 0:  # the session's model process; its first lines say which one
                self._run = worker.shared_worker().submit(python, self._job.request_file, env, self.workerIdleTimeout)
            else:
                command = build_predict_command(python, self._job.request_file)
                self.log("Running: " + " ".join(command))
                self._run = ProcessRunner(command, env=env, cwd=folder)
        else:
            maps = {kind: explanations.RESULT_MAPS[kind] for kind in explanations.STYLES} if request.explain else {}
            self.log(f"Sending the image to {monailabel_client.normalise_url(serverUrl)} (model {serverModel!r})"
                     + (", then asking for each explanation map the served model gives (one request each)"
                        if maps else ""))
            self._run = BackgroundCall(monailabel_client.infer_maps, serverUrl, serverModel, self._job.input_file,
                                       request.server_params(), self._job.output_dir, maps)
        self._run.start()

    def poll(self) -> RunUpdate:
        """New output, progress and state of the running segmentation."""
        return self._run.poll() if self._run is not None else RunUpdate(RunState.NOT_STARTED)

    def cancel(self) -> None:
        """Stop the running segmentation (local: the whole process tree; remote: the answer is ignored)."""
        if self._run is not None:
            self._run.cancel()

    def finish(self, outputSegmentation: slicer.vtkMRMLSegmentationNode) -> str:
        """Read the finished result into ``outputSegmentation``; returns the segment's name.

        The segment is named after the prompt and coloured by it; a segment of the same name is replaced.

        Raises:
            ProcessFailedError, ServerError: with the backend's own explanation.
            GridMismatchError: if a local result is not on the input's grid.
        """
        if self._run is None or self._run.state is not RunState.SUCCEEDED:
            if self._job is not None and self._run is not None and self._run.state is RunState.FAILED:
                self.log(f"The job folder is kept to look into or repeat by hand: {self._job.folder}")
            if isinstance(self._run, BackgroundCall):
                self._run.result()
            elif self._run is not None:
                self._run.raise_for_status()
            raise ValueError("no finished segmentation to read")
        if isinstance(self._run, BackgroundCall):
            mapFiles = dict(self._run.result())
            maskFile = mapFiles.pop("mask")
        else:
            maskFile, mapFiles = self._job.mask_file, self._job.explanation_files
        shape, matrix = self._grid
        # The local package writes on the input's header: any other grid is a bug. A server may reorient.
        mask = volume_io.read_on_grid(maskFile, shape, matrix, allow_resample=self._backend == REMOTE)
        name = segments.segment_name(self._prompt)
        segmentation = outputSegmentation.GetSegmentation()
        outputSegmentation.CreateDefaultDisplayNodes()
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(self._input)
        outputSegmentation.SetAndObserveTransformNodeID(self._input.GetTransformNodeID())
        segmentId = segmentation.GetSegmentIdBySegmentName(name)
        if not segmentId:
            segmentId = segmentation.AddEmptySegment("", name, list(segments.segment_color(self._prompt)))
        slicer.util.updateSegmentBinaryLabelmapFromArray((mask > 0).astype(np.uint8), outputSegmentation, segmentId,
                                                         self._input)
        self.log(f"Segment '{name}': {int((mask > 0).sum())} voxels.")
        self.explanationVolumes = []
        if self._explain:
            maps = explanations.read_explanations(mapFiles, shape, matrix, allow_resample=self._backend == REMOTE)
            self.explanationVolumes = [self.explanationVolume(kind, values) for kind, values in maps.items()]
            self.log("Explanation maps: " + ", ".join(f"'{v.GetName()}'" for v in self.explanationVolumes))
        shutil.rmtree(self._job.folder, ignore_errors=True)
        self._run = None
        return name

    def explanationVolume(self, kind: str, values: np.ndarray) -> slicer.vtkMRMLScalarVolumeNode:
        """A scalar volume of an explanation map on the input's grid, named after the prompt and the kind (the volume
        of that name is updated), displayed as ``explanations.STYLES[kind]`` says."""
        name = explanations.explanation_name(self._prompt, kind)
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None or node.GetClassName() != "vtkMRMLScalarVolumeNode":
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(self._grid[1]))
        slicer.util.updateVolumeFromArray(node, values)
        node.SetAndObserveTransformNodeID(self._input.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        low, high = explanations.style_display(node.GetDisplayNode(), kind, values)
        self.log(f"'{name}': values {float(values.min()):.3f} to {float(values.max()):.3f}, colours span "
                 f"{low:.3f} to {high:.3f}")
        return node

    def process(self, inputVolume: slicer.vtkMRMLScalarVolumeNode, outputSegmentation: slicer.vtkMRMLSegmentationNode,
                request: SegmentationRequest, backend: str = LOCAL, serverUrl: str = DEFAULT_SERVER,
                serverModel: str = DEFAULT_SERVER_MODEL, timeout: float = 600.0) -> str:
        """Segment and wait (scripts, tests). Returns the segment's name.

        Raises:
            TimeoutError: if it takes longer than ``timeout`` seconds (the run is cancelled).
            ProcessFailedError, ServerError, ValueError: as :meth:`start` and :meth:`finish`.
        """
        self.start(inputVolume, request, backend, serverUrl, serverModel)
        try:
            if isinstance(self._run, BackgroundCall):
                self._run.wait(timeout)
            else:
                self._run.wait(timeout, on_update=lambda update: [self.log(line) for line in update.lines
                                                                  if parse_progress(line) is None])
        except TimeoutError:
            self.cancel()
            raise
        return self.finish(outputSegmentation)


#
# TextPromptSegmentationTest
#


class TextPromptSegmentationTest(ScriptedLoadableModuleTest):
    """End-to-end self-test in Slicer: synthetic volumes segmented by the local backend.

    Runs the package with the interpreter set in the module's Advanced section (its saved setting), else with
    Slicer's Python; where that interpreter lacks the package (with its shipped weights), the test says so and skips.
    """

    PROMPT = EXAMPLE_PROMPTS[0]

    def setUp(self) -> None:
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run every test."""
        self.setUp()
        python = self.configuredPython()
        reason = self.missingPackage(python)
        if reason:
            self.delayDisplay(f"Skipped: {reason}")
            return
        self.delayDisplay("Running the package with " + (python or "Slicer's Python"))
        self.test_Segment3DObliqueVolume()
        self.setUp()
        self.test_SegmentSingleSlice()

    @staticmethod
    def configuredPython() -> str | None:
        """The interpreter saved under Advanced (the widget's ``Python`` setting); ``None`` means Slicer's own."""
        return str(qt.QSettings().value(SETTINGS + "Python", "") or "").strip() or None

    @staticmethod
    def missingPackage(python: str | None) -> str | None:
        """Why the package cannot run with ``python`` (``None``: Slicer's), or ``None`` if it can. Nothing is
        imported in Slicer's process to check."""
        missing = dependencies.missing_requirements(dependencies.IO_REQUIREMENTS)
        if missing:
            return (f"Slicer's Python lacks {', '.join(missing)} (open the module and press 'Install "
                    "dependencies').")
        if python is None:
            if dependencies.missing_requirements({dependencies.PACKAGE_MODULE: DEFAULT_PACKAGE}):
                return ("the causalclipseg package is not installed in Slicer's Python (open the module and press "
                        "'Install dependencies', or set a Python interpreter under Advanced).")
            return None
        logic = TextPromptSegmentationLogic()
        logic.pythonExecutable = python
        try:
            logic.interpreter()
        except FileNotFoundError as err:
            return f"{err} (set under Advanced)."
        try:
            missing = dependencies.missing_in_interpreter(
                python, {dependencies.PACKAGE_MODULE: DEFAULT_PACKAGE}, env=child_environment(os.environ, False))
        except RuntimeError as err:
            return f"{err}."
        if missing:
            return f"the causalclipseg package is not installed for the Python interpreter {python} set under Advanced."
        return None

    def segmentSynthetic(self, shape: tuple[int, int, int], ijkToRAS: np.ndarray) -> None:
        """Segment a synthetic bright blob and check the segment's name, colour and grid."""
        k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]]
        blob = ((i - shape[2] / 2) ** 2 + (j - shape[1] / 2) ** 2 < (min(shape[1:]) / 4) ** 2)
        array = (200.0 * blob + np.random.default_rng(0).normal(0, 10, shape)).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name="synthetic")
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        logic = TextPromptSegmentationLogic()
        logic.logCallback = self.delayDisplay
        logic.pythonExecutable = self.configuredPython()
        name = logic.process(volume, output, SegmentationRequest(self.PROMPT, device="auto"), timeout=300)
        self.assertEqual(name, segments.segment_name(self.PROMPT))
        segmentId = output.GetSegmentation().GetSegmentIdBySegmentName(name)
        self.assertTrue(segmentId)
        color = output.GetSegmentation().GetSegment(segmentId).GetColor()
        np.testing.assert_allclose(color, segments.segment_color(self.PROMPT), atol=1e-6)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(output, segmentId, volume)
        self.assertEqual(mask.shape, array.shape)
        self.delayDisplay(f"{name}: {int(mask.sum())} voxels on a {array.shape} grid")

    def test_Segment3DObliqueVolume(self) -> None:
        """An anisotropic volume with an oblique direction matrix."""
        angle = np.deg2rad(20)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])
        ijkToRAS[:3, 3] = [-40.0, 12.5, 100.0]
        self.segmentSynthetic((6, 96, 80), ijkToRAS)
        self.delayDisplay("3-D oblique volume passed")

    def test_SegmentSingleSlice(self) -> None:
        """A single-slice volume, as an X-ray is loaded."""
        ijkToRAS = np.diag([-0.3, -0.3, 1.0, 1.0])
        self.segmentSynthetic((1, 128, 112), ijkToRAS)
        self.delayDisplay("Single-slice volume passed")
