"""A headless 3D Slicer application around ``slicer-core``, for running a scripted module's Logic on real MRML nodes.

``slicer-core`` (PyPI) is Slicer's core without Qt: the MRML scene, volume and segmentation nodes, storage nodes, the
application logic and the module logics (volumes, segmentations, colors), and ``slicer.util``. What a running Slicer
adds on top is Qt: ``slicer.app`` (``qSlicerApplication``), the IO manager behind ``slicer.util.loadVolume`` and
``saveNode`` (``qSlicerCoreIOManager``), ``slicer.modules`` (filled by the module manager),
``slicer.ScriptedLoadableModule`` (it imports ``qt`` and ``ctk``), and the ``qt`` and ``ctk`` modules themselves.

:func:`install` builds the scene and the logics as ``qSlicerCoreApplication`` and the module manager wire them
(``vtkSlicerApplicationLogic`` holding the scene; each module logic given the scene and the application logic and
registered with ``SetModuleLogic``) and supplies only what the wheel lacks:

- ``slicer.app``: the scene, the application logic, the IO manager, ``temporaryPath``; anything else a
  ``qSlicerApplication`` has (layout manager, main window, ...) raises :class:`HeadlessQtError`.
- An IO manager that loads and saves volumes the way ``qSlicerVolumesReader`` and ``qSlicerNodeWriter`` do: with
  ``vtkSlicerVolumesLogic.AddArchetypeVolume`` and the node's own storage node (Slicer's readers and writers).
- ``slicer.modules.volumes``, ``.segmentations``, ``.colors`` with ``logic()``, as ``slicer.util`` calls them.
- ``slicer.ScriptedLoadableModule``: the four base classes with what a module uses of them (a Test's
  ``delayDisplay`` records and logs the message; a Widget cannot be made: it needs Qt).
- ``qt`` and ``ctk`` modules that can be imported (a module file names them in annotations and base classes) but
  raise :class:`HeadlessQtError` on any use, so a Logic that touches Qt fails loudly instead of passing here. The one
  exception is ``qt.QSettings``, which a module's Test reads as Slicer's own does: :class:`HeadlessSettings`, held in
  :data:`SETTINGS` (in memory) for a test to fill.

The module file under test is imported unchanged; nothing of the module is replaced.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
import unittest
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer
import vtk

__all__ = ["HeadlessQtError", "HeadlessApplication", "HeadlessIOManager", "HeadlessSettings", "HeadlessSlicer",
           "install", "PackageInOtherInterpreter", "DISPLAYED", "SETTINGS"]

# Messages shown by ScriptedLoadableModuleTest.delayDisplay, oldest first (Slicer shows them in a popup).
DISPLAYED: list[str] = []
# What qt.QSettings holds (Slicer keeps it in its .ini file), key -> value.
SETTINGS: dict[str, Any] = {}

_VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".hdr", ".img", ".img.gz")
# vtkSlicerVolumesLogic::AddArchetypeVolume's loading options, one bit each, as qSlicerVolumesReader sets them.
_LOADING_OPTIONS = {"labelmap": 0x1, "center": 0x2, "singleFile": 0x4, "autoWindowLevel": 0x8,
                    "discardOrientation": 0x10}


class HeadlessQtError(RuntimeError):
    """Something needed Qt (a widget, a dialog, ``qt.*``, ``ctk.*``), which the headless application does not have."""


class HeadlessSettings:
    """``qt.QSettings`` over :data:`SETTINGS`: ``value`` and ``setValue`` as a module calls them."""

    def value(self, key: str, default: Any = None) -> Any:
        """The stored value of ``key``, else ``default``."""
        return SETTINGS.get(key, default)

    def setValue(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``."""
        SETTINGS[key] = value


def _qt_free_module(name: str, usable: dict[str, Any] | None = None) -> types.ModuleType:
    """A module ``name`` that imports, but raises :class:`HeadlessQtError` when any of its attributes is used, except
    those of ``usable``."""
    module = types.ModuleType(name, f"Stand-in for Slicer's {name!r} module: importable, unusable (no Qt here).")
    for attribute, value in (usable or {}).items():
        setattr(module, attribute, value)

    def __getattr__(attribute: str) -> Any:
        if attribute.startswith("__"):  # import machinery and introspection probe dunders; answer them normally
            raise AttributeError(attribute)
        raise HeadlessQtError(f"{name}.{attribute} was used, but the headless Slicer has no Qt: the Logic must run "
                              "without widgets")

    module.__getattr__ = __getattr__
    return module


def _scripted_loadable_module() -> types.ModuleType:
    """``slicer.ScriptedLoadableModule`` with the base classes and what a module uses of them."""
    module = types.ModuleType("slicer.ScriptedLoadableModule",
                              "Stand-in for Slicer's ScriptedLoadableModule (whose real one imports qt and ctk).")

    class ScriptedLoadableModule:
        """The module's description; registers its self-test in ``slicer.selfTests`` as Slicer does. No icon (a
        ``qt.QIcon``)."""

        def __init__(self, parent: Any) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__
            parent.title, parent.categories, parent.dependencies = "", [], []
            parent.contributors, parent.helpText, parent.acknowledgementText = [], "", ""
            if not hasattr(slicer, "selfTests"):
                slicer.selfTests = {}
            slicer.selfTests[self.moduleName] = self.runTest

        def resourcePath(self, filename: str) -> str:
            """The path of ``filename`` in the module's ``Resources`` folder."""
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def runTest(self, msec: int = 100, **kwargs: Any) -> None:
            """Run the module's ``<ModuleName>Test`` case, as *Reload and Test* does.

            Raises:
                AssertionError: if the module has no such class, or the test fails.
            """
            testCaseClass = getattr(sys.modules[type(self).__module__], self.moduleName + "Test", None)
            if testCaseClass is None:
                raise AssertionError(f"Test case class not found: {type(self).__module__}.{self.moduleName}Test")
            testCase = testCaseClass()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        """The panel: needs Qt, so it cannot be made here."""

        def __init__(self, parent: Any = None) -> None:
            raise HeadlessQtError(f"{type(self).__name__} is a Qt widget; the headless Slicer has no Qt")

    class ScriptedLoadableModuleLogic:
        """The logic base: a module name and the parameter-node policy."""

        def __init__(self, parent: Any = None) -> None:
            name = type(self).__name__
            self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name
            self.isSingletonParameterNode = True

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """The test base: ``unittest.TestCase`` whose ``delayDisplay`` records and logs instead of a popup."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.moduleTestNames: list[str] = []
            super().__init__(*args, **kwargs)
            self.enableScreenshots = False
            self.screenshotScaleFactor = 1.0
            self.moduleTestNames = [m for m in dir(self) if "test" in m and callable(getattr(self, m))]

        def delayDisplay(self, message: str, requestedDelay: int | None = None, msec: int | None = None) -> None:
            """Record the message in :data:`DISPLAYED` and log it."""
            DISPLAYED.append(str(message))
            logging.info("delayDisplay: %s", message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    module.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                      "ScriptedLoadableModuleTest"]
    return module


def _volume_suffix(filename: str) -> str:
    name = os.path.basename(filename).lower()
    return next((s for s in sorted(_VOLUME_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


class HeadlessIOManager:
    """The part of ``qSlicerCoreIOManager`` that ``slicer.util.loadVolume``, ``loadLabelVolume`` and ``saveNode`` call,
    for volumes: loading with ``vtkSlicerVolumesLogic.AddArchetypeVolume`` (what ``qSlicerVolumesReader`` does) and
    saving with the node's storage node (what ``qSlicerNodeWriter`` does). Other file types raise, loudly.
    """

    def __init__(self, scene: slicer.vtkMRMLScene, volumes_logic: slicer.vtkSlicerVolumesLogic) -> None:
        self.scene = scene
        self.volumes_logic = volumes_logic

    def fileType(self, filename: str | os.PathLike) -> str:
        """``VolumeFile`` for a volume file name.

        Raises:
            NotImplementedError: for anything else.
        """
        if _volume_suffix(str(filename)):
            return "VolumeFile"
        raise NotImplementedError(f"the headless IO manager reads volumes only, not {filename}")

    def loadNodes(self, fileType: str, properties: dict, loadedNodes: vtk.vtkCollection,
                  userMessages: slicer.vtkMRMLMessageCollection) -> bool:
        """Load a volume as ``qSlicerVolumesReader::load`` does; returns whether it succeeded.

        Raises:
            NotImplementedError: for a file type other than ``VolumeFile``.
        """
        if fileType != "VolumeFile":
            raise NotImplementedError(f"the headless IO manager reads volumes only, not {fileType}")
        filename = str(properties["fileName"])
        name = properties.get("name") or os.path.basename(filename).split(".")[0]  # QFileInfo::baseName
        options = sum(bit for key, bit in _LOADING_OPTIONS.items() if properties.get(key))
        node = self.volumes_logic.AddArchetypeVolume(filename, name, options, None, userMessages)
        if node is None:
            return False
        loadedNodes.AddItem(node)
        return True

    def fileWriterFileType(self, node: slicer.vtkMRMLNode) -> str:
        """``VolumeFile`` for a volume node.

        Raises:
            NotImplementedError: for other nodes.
        """
        if node.IsA("vtkMRMLVolumeNode"):
            return "VolumeFile"
        raise NotImplementedError(f"the headless IO manager writes volumes only, not {node.GetClassName()}")

    def saveNodes(self, fileType: str, properties: dict, userMessages: slicer.vtkMRMLMessageCollection) -> bool:
        """Write a node with its storage node as ``qSlicerNodeWriter::write`` does; returns whether it succeeded."""
        node = self.scene.GetNodeByID(properties["nodeID"])
        if node is None:
            raise ValueError(f"no node {properties['nodeID']!r} in the scene")
        storage = node.GetStorageNode()
        if storage is None:
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
        storage.SetFileName(str(properties["fileName"]))
        if properties.get("fileFormat"):
            storage.SetWriteFileFormat(properties["fileFormat"])
        storage.SetURI(None)
        if "useCompression" in properties:
            storage.SetUseCompression(int(properties["useCompression"]))
        written = bool(storage.WriteData(node))
        userMessages.AddMessages(storage.GetUserMessages())
        return written


class HeadlessApplication:
    """``slicer.app``: what a Logic and ``slicer.util`` use of ``qSlicerApplication`` without Qt. Anything else
    raises :class:`HeadlessQtError`."""

    applicationName = "Slicer (headless, slicer-core)"

    def __init__(self, scene: slicer.vtkMRMLScene, app_logic: slicer.vtkSlicerApplicationLogic,
                 io_manager: HeadlessIOManager, temporary_path: str) -> None:
        self._scene, self._app_logic, self._io_manager = scene, app_logic, io_manager
        self.temporaryPath = temporary_path

    def mrmlScene(self) -> slicer.vtkMRMLScene:
        return self._scene

    def applicationLogic(self) -> slicer.vtkSlicerApplicationLogic:
        return self._app_logic

    def coreIOManager(self) -> HeadlessIOManager:
        return self._io_manager

    ioManager = coreIOManager

    def testingEnabled(self) -> bool:
        """Slicer's testing mode: message boxes are not shown."""
        return True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise HeadlessQtError(f"slicer.app.{name} was used, but the headless Slicer has no Qt application")


@dataclass
class _ModuleHandle:
    """``slicer.modules.<name>``: a loadable module's name and its logic."""

    name: str
    _logic: Any = field(repr=False)

    def logic(self) -> Any:
        return self._logic


@dataclass
class HeadlessSlicer:
    """The headless application's parts."""

    scene: slicer.vtkMRMLScene
    app_logic: slicer.vtkSlicerApplicationLogic
    colors_logic: slicer.vtkSlicerColorLogic
    volumes_logic: slicer.vtkSlicerVolumesLogic
    segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic
    app: HeadlessApplication


def _module_logic(cls: Callable[[], Any], name: str, scene: slicer.vtkMRMLScene,
                  app_logic: slicer.vtkSlicerApplicationLogic) -> Any:
    """A module logic wired as ``qSlicerAbstractCoreModule`` and the module manager wire it."""
    logic = cls()
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic(name, logic)
    return logic


def install(temporary_path: str | os.PathLike) -> HeadlessSlicer:
    """Build the headless application and put it where a module looks: ``slicer.app``, ``slicer.mrmlScene``,
    ``slicer.modules``, ``slicer.ScriptedLoadableModule``, and the ``qt``/``ctk`` stand-ins in ``sys.modules``.

    Raises:
        RuntimeError: if ``qt`` or ``ctk`` can be imported here (this harness is for ``slicer-core`` without Qt),
            or if ``slicer.app`` is already set (a real Slicer).
    """
    if getattr(slicer, "app", None) is not None and not isinstance(slicer.app, HeadlessApplication):
        raise RuntimeError("slicer.app is already set: this is a running Slicer, not slicer-core")
    for name in ("qt", "ctk"):
        if name not in sys.modules and importlib.util.find_spec(name) is not None:
            raise RuntimeError(f"a real {name!r} module is importable here; the headless harness expects slicer-core "
                               "without Qt")
        sys.modules.setdefault(name, _qt_free_module(name, {"QSettings": HeadlessSettings} if name == "qt" else None))

    Path(temporary_path).mkdir(parents=True, exist_ok=True)
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.SetTemporaryPath(str(temporary_path))
    colors = _module_logic(slicer.vtkSlicerColorLogic, "Colors", scene, app_logic)
    app_logic.SetColorLogic(colors)  # as qSlicerColorsModule::setup
    volumes = _module_logic(slicer.vtkSlicerVolumesLogic, "Volumes", scene, app_logic)
    segmentations = _module_logic(slicer.vtkSlicerSegmentationsModuleLogic, "Segmentations", scene, app_logic)
    app = HeadlessApplication(scene, app_logic, HeadlessIOManager(scene, volumes), str(temporary_path))

    modules = types.ModuleType("slicer.modules", "The loaded modules, by lower-case name.")
    for name, logic in (("colors", colors), ("volumes", volumes), ("segmentations", segmentations)):
        setattr(modules, name, _ModuleHandle(name.capitalize(), logic))
    scripted = _scripted_loadable_module()
    sys.modules["slicer.modules"] = modules
    sys.modules["slicer.ScriptedLoadableModule"] = scripted
    slicer.app, slicer.mrmlScene, slicer.modules, slicer.ScriptedLoadableModule = app, scene, modules, scripted
    slicer.selfTests = {}
    SETTINGS.clear()
    return HeadlessSlicer(scene, app_logic, colors, volumes, segmentations, app)


class PackageInOtherInterpreter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``importlib.util.find_spec(name)`` find a package that lives in another interpreter, and refuses to
    import it.

    In Slicer, ``PythonSlicer`` is the application's own interpreter: a package installed for it is visible to
    ``find_spec`` in Slicer's process, which checks for it without importing it (the module must never import torch
    there). Here ``PythonSlicer`` runs the model's environment instead, so this finder answers ``find_spec`` as that
    interpreter would; an actual import in Slicer's process raises, loudly.

    Args:
        name: the top-level package (``causalclipseg``).
        origin: its ``__init__.py`` in the other interpreter.
    """

    def __init__(self, name: str, origin: str) -> None:
        self.name, self.origin = name, origin

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=self.origin, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        raise RuntimeError(f"Slicer's process imported {spec.name!r}; the module must run it in a subprocess only "
                           "(it imports torch)")

    def exec_module(self, module: types.ModuleType) -> None:  # never reached: create_module raises
        raise RuntimeError(f"Slicer's process imported {module.__name__!r}")
