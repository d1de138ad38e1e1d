"""The Python the MONAI bundle (``bundle/``) needs beyond the package's transforms, inferer and writer.

``bundle/configs/inference.json`` declares the package's one inference path (:mod:`causalclipseg.inference.
predictor`) in MONAI's vocabulary: :func:`list_inputs` -> ``preprocessing`` (``LoadSegmentableImaged``,
``WarnUnverifiableSided``, ``DisplayOrientationd``, ``ModelTokensd``) -> ``SliceWiseInferer`` with the model as the
network and the prompt's token ids as its second input -> ``postprocessing`` (``Invertd``, ``Activationsd``,
``AsDiscreted``) -> ``writer`` (``SaveMaskd``). With ``explain`` the network is :class:`ExplainNetwork` (the model's
``explain``: the logits, and the causal mask of a model with a causal module) and ``SplitExplanationd`` heads the
postprocessing, so that the writer also writes the model's ``explanation_maps`` (the lesion probability, and the
causal mask when there is one); with ``dicom_seg`` it also writes a DICOM Segmentation of each DICOM
input's mask. :class:`ExportNetwork` is the TorchScript export.

The prompt comes from the config, the command line (:func:`resolve_prompt` undoes what python-fire does to
``"left, right"``) or a file; its "left" and "right" are the patient's sides unless ``prompt_side`` is ``viewer``.
Training (``train.json``, and ``multi_gpu_train.json`` under torchrun) builds the package's one trainer,
:class:`causalclipseg.training.trainer.Trainer`, from a ``TrainConfig``; evaluation (``evaluate.json``) scores a
checkpoint under both metric protocols with the package's evaluation
(:func:`causalclipseg.evaluation.evaluate.evaluate_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .io import inputs as io_inputs
from .tokenizer import read_prompt, validate_prompt

logger = logging.getLogger(__name__)

__all__ = ["ExplainNetwork", "ExportNetwork", "list_inputs", "resolve_prompt"]


# ----------------------------------------------------------------------------------------------------- prompts
def _raw_cli_value(key: str, argv: Sequence[str]) -> str | None:
    """The text after the last ``--key`` (or ``--key=...``) in ``argv``, exactly as the shell passed it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{key}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def resolve_prompt(prompt: object = None, prompt_file: str | os.PathLike | None = None, key: str = "prompt",
                   argv: Sequence[str] | None = None) -> str:
    """The prompt text, from a file or from the config / command line, intact.

    ``python -m monai.bundle run ... --prompt "left, right"`` reaches the config as the tuple ``('left', 'right')``
    and ``--prompt 2`` as the int ``2``: python-fire parses every argument as a Python literal. When the value is
    not a string, the text is taken verbatim from the command line (``sys.argv``); without one there, a sequence
    is joined with ``", "``. A prompt file (UTF-8, stripped) wins over ``prompt`` and is safe for any text,
    including strings that start with ``$``, ``@`` or ``%`` (which MONAI's config parser would evaluate).

    Args:
        prompt: the config's ``prompt`` value.
        prompt_file: a UTF-8 text file holding the prompt; ``None`` or ``""`` for none.
        key: the config key the prompt was given under on the command line.
        argv: the command line; ``sys.argv`` by default.

    Raises:
        ValueError: if the file cannot be read, the prompt is empty, is the name of a file (use ``prompt_file``),
            or breaks the prompt policy of :func:`causalclipseg.tokenizer.validate_prompt`.
    """
    if prompt_file:
        text = read_prompt(None, prompt_file, f"--{key}_file")
        where = f"prompt_file {prompt_file}"
    else:
        text = prompt
        if not isinstance(prompt, str):
            raw = _raw_cli_value(key, sys.argv if argv is None else argv)
            if raw is not None:
                text = raw
            elif isinstance(prompt, (tuple, list)):
                text = ", ".join(str(part) for part in prompt)
            elif prompt is not None:
                text = str(prompt)
        where = key
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} must contain text, got {text!r}: set --{key} 'your prompt' or --{key}_file FILE")
    if not prompt_file:
        read_prompt(text, None, f"--{key}_file")  # refuses a prompt that names a file
    logger.info("prompt: %r", text)
    return validate_prompt(text)


# ------------------------------------------------------------------------------------------------------ inputs
def list_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """Records ``{"image": path}`` for the evaluator's dataset: one per input of
    :func:`causalclipseg.io.inputs.list_inputs` (the input policy every front door shares).

    Raises:
        FileNotFoundError, ValueError: as :func:`causalclipseg.io.inputs.list_inputs`.
    """
    return [{"image": str(path)} for path in io_inputs.list_inputs(inputs)]


# ----------------------------------------------------------------------------------------------------- explain
class ExplainNetwork(nn.Module):
    """The network the bundle's evaluator runs with ``explain``: the model's
    :meth:`~causalclipseg.model.causalclipseg.CausalCLIPSeg.explain` as a module's ``forward`` (MONAI's evaluator
    calls a module), so that the one inference path carries the causal mask, when the model has one, beside the
    logits.

    Args:
        network: the bundle's ``network_def``; its weights stay its own (the checkpoint is loaded into it).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) preprocessed, text (B or 1, L) token ids -> (B, C, S, S): the logits, and with a
        causal module the causal mask (C = 2)."""
        return self.network.explain(image, text)


# ------------------------------------------------------------------------------------------------------ export
def _add_prefix(state_dict: dict, prefix: str, name: str) -> None:
    """``<prefix><key>`` -> ``<prefix><name><key>`` for keys that lack ``name``, in place."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + name)]:
        state_dict[prefix + name + key[len(prefix):]] = state_dict.pop(key)


class ExportNetwork(nn.Module):
    """CausalCLIPSeg traced for TorchScript, with the token ids as its second input: the ``ckpt_export`` target.

    ``torch.jit.script`` cannot compile the package's wrappers around open_clip's towers (``math.isqrt``,
    ``Sequence`` annotations, the ``TextFeatures`` dataclass), and MONAI's ``ckpt_export`` traces with one input only,
    so the model is traced here with ``(image, tokens)`` and wrapped in a scriptable module. The trace fixes the
    shapes: ``image`` ``(batch_size, 3, S, S)`` preprocessed as :class:`SlicePreprocessing` does (S is the
    variant's ``image_size``) and ``text`` ``(batch_size, L)`` token ids from the package's tokenizer; any prompt
    works. Loading accepts CausalCLIPSeg's own state dict (``models/model.pt``).

    Args:
        network: the bundle's ``network_def``, the model to export.
        batch_size: the batch size the export is traced for.
    """

    def __init__(self, network: nn.Module, batch_size: int = 1) -> None:
        super().__init__()
        model = network.eval()
        size = model.config.image_size
        example = (torch.zeros(batch_size, 3, size, size), model.tokenize("left lung").expand(batch_size, -1))
        with torch.no_grad(), warnings.catch_warnings():
            # shape-dependent Python in the encoders is traced for the shapes above, as documented
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            self.traced = torch.jit.trace(model, example, check_trace=False)
        self.register_load_state_dict_pre_hook(self._complete_state_dict)

    def _complete_state_dict(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Add ``traced.`` to CausalCLIPSeg keys; fill the buffers the model does not save (tracing made them
        persistent) from the traced module's own values."""
        _add_prefix(state_dict, prefix, "traced.")
        for key, value in self.traced.state_dict().items():
            state_dict.setdefault(prefix + "traced." + key, value)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) preprocessed, text (B, L) token ids -> logits (B, 1, S, S)."""
        return self.traced(image, text)
