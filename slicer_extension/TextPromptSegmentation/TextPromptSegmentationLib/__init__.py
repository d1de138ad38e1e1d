"""Slicer-free logic of the TextPromptSegmentation module, tested with pytest outside Slicer.

Nothing here imports slicer, qt, vtk or torch: numpy and the standard library, plus nibabel and pynrrd when a
volume file is written or read.

- :mod:`.request`: the local backend's job folder (volume, prompt, ``request.json``) and predict command.
- :mod:`.runner`: a subprocess with non-blocking output, progress, and whole-tree cancel.
- :mod:`.worker`: the local backend's warm model, one ``causalclipseg worker`` process kept between runs.
- :mod:`.explanations`: the probability and causal-mask maps as the module shows them.
- :mod:`.volume_io`: numpy array + IJK-to-RAS matrix to and from NIfTI/NRRD, exact geometry.
- :mod:`.segments`: segment name and colour from the prompt.
- :mod:`.monailabel_client`: the remote backend.
- :mod:`.dependencies`: first-use install that never replaces what Slicer ships.
"""
