"""The Python the MONAI bundle (``bundle/``) needs; its configs stay thin and point here.

The walk of ``bundle/configs/inference.json``: :func:`list_inputs` (a file, a folder, a DICOM series or a
datalist) -> :class:`LoadSegmentableImaged` (2-D ``(1, X, Y)`` or a volume ``(1, X, Y, Z)``, no
resampling) -> :class:`DisplayOrientationd` (the patient's left on the image's right) -> :class:`SliceWiseInferer`
(volumes streamed in batches of slices) -> :class:`BundleNetwork` (per-slice preprocessing, ``CausalCLIPSeg.forward``
with the prompt's tokens, logits back on the slice grid) -> ``Invertd`` (back to the input's grid) -> sigmoid,
threshold -> :class:`SaveMaskd` (NIfTI on the input's grid, PNG too for 2-D).

The prompt comes from the config, the command line (:func:`resolve_prompt` undoes what python-fire does to
``"left, right"``) or a file; its "left" and "right" are the patient's sides unless ``prompt_side`` is ``viewer``.
Training (``train.json``) reuses the package's transforms, loss and gradient-reversal schedule through
:class:`TrainingNetwork`, :class:`StackedCausalSegLoss` and :class:`ReversalSchedule`; evaluation
(``evaluate.json``) reports both metric protocols with :class:`SegmentationScoresHandler`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils import ImageMetaKey
from torch import nn

from .data.pipelines import get_slice_preprocessing
from .data.prompts import check_prompt_side
from .evaluation.metrics import SegmentationScores
from .factory import DEFAULT_MODEL, create_model
from .inference.predictor import (
    SliceWiseInferer,
    WarnUnverifiableSided,
    inference_ready,
    model_tokens,
)
from .io import inputs as io_inputs
from .io.orientation import DisplayOrientationd
from .io.reader import LoadSegmentableImaged
from .io.writers import SaveMaskd
from .model.causalclipseg import CausalCLIPSegOutput
from .tokenizer import read_prompt, validate_prompt
from .training.losses import CausalSegLoss
from .training.trainer import param_groups, reversal_coefficient

logger = logging.getLogger(__name__)

__all__ = ["BundleNetwork", "DisplayOrientationd", "ExportNetwork", "LoadSegmentableImaged", "ReversalSchedule",
           "SaveMaskd", "SegmentationScoresHandler", "SliceWiseInferer", "StackedCausalSegLoss", "TrainingNetwork",
           "WarnUnverifiableSided", "list_inputs", "optimizer_param_groups", "resolve_prompt"]



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


# ----------------------------------------------------------------------------------------------------- network
def _strip_model_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``<prefix>model.<key>`` -> ``<prefix><key>`` (CausalCLIPSeg's own keys)."""
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        state_dict[prefix + key[len(prefix) + len("model."):]] = state_dict.pop(key)


def _add_prefix(state_dict: dict, prefix: str, name: str) -> None:
    """``<prefix><key>`` -> ``<prefix><name><key>`` for keys that lack ``name``, in place."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + name)]:
        state_dict[prefix + name + key[len(prefix):]] = state_dict.pop(key)


def _add_model_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: accept CausalCLIPSeg's own keys by adding ``model.``."""
    _add_prefix(state_dict, prefix, "model.")


class BundleNetwork(nn.Module):
    """The bundle's ``network_def``: raw slices and a text input in, logits on the slices' grid out.

    Like :class:`~causalclipseg.inference.predictor.SliceSegmenter` (each slice preprocessed as in training), with
    the text as an optional second input, because MONAI's tools feed networks differently: inferers call
    ``network(x)`` (the bound ``prompt`` is used), ``verify_net_in_out`` passes ``extra_forward_args`` parsed from
    the command line (a list of token ids or a string), MONAI Label and scripts pass token tensors.

    Its state dict has CausalCLIPSeg's keys (no ``model.`` prefix), so ``models/model.pt`` is the package's weight
    file, usable by ``create_model(checkpoint=...)`` as well as by MONAI's ``CheckpointLoader``. Prompt strings are
    translated to the loaded weights' laterality convention when they are tokenised, after the weights are loaded
    (:func:`~causalclipseg.inference.predictor.model_tokens`); token ids are taken as they are.

    Args:
        model_name: a variant from :func:`causalclipseg.list_models` (random weights; load a checkpoint after).
        prompt: the prompt used when ``forward`` gets no text; ``None`` to require text.
        pretrained: CLIP encoder weights (an open_clip tag or file), for training from CLIP.
        prompt_side: whose left the prompts' "left" is: ``patient`` (default) or ``viewer``.
        model_prompt_side: the convention the weights learn when trained (training reads captions in it); loaded
            weights bring their own.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL, prompt: str | None = None,
                 pretrained: str | None = None, prompt_side: str = "patient",
                 model_prompt_side: str | None = None) -> None:
        super().__init__()
        self.model = inference_ready(create_model(model_name, pretrained=pretrained))  # channels-last weights
        if model_prompt_side is not None:
            self.model.prompt_side = model_prompt_side
        self.preprocess = get_slice_preprocessing(self.model.config.image_size)
        self.context_length = self.model.tokenizer.context_length
        self.prompt_side = check_prompt_side(prompt_side)
        self.prompt = prompt
        if prompt is not None:
            model_tokens(self.model, prompt, self.prompt_side)  # refuse a bad prompt now, not at the first slice
        self.register_buffer("device_marker", torch.zeros(0), persistent=False)  # follows .to(device)
        self._bound: tuple[tuple, torch.Tensor] | None = None  # the bound prompt's tokens, per convention and device
        self.register_state_dict_post_hook(_strip_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)

    def as_tokens(self, text: torch.Tensor | Sequence | str | None) -> torch.Tensor:
        """Token ids ``(B, context_length)`` from token ids (tensor or nested list, zero-padded), a prompt string
        (translated to the model's laterality convention), or ``None`` (the bound prompt).

        Raises:
            ValueError: if ``text`` is ``None`` and no prompt is bound, or holds too many tokens.
        """
        device = self.device_marker.device
        if text is None:
            if self.prompt is None:
                raise ValueError("text is required: pass token ids (B, L) or a prompt, or build the network with "
                                 "a prompt")
            key = (self.model.prompt_side, device)  # weights loaded after construction may change the convention
            if self._bound is None or self._bound[0] != key:
                self._bound = (key, model_tokens(self.model, self.prompt, self.prompt_side).to(device))
            return self._bound[1]
        if isinstance(text, str):
            return model_tokens(self.model, text, self.prompt_side).to(device)
        tokens = torch.as_tensor(text, dtype=torch.int64, device=device)
        tokens = tokens[None] if tokens.ndim == 1 else tokens  # (L,) -> (1, L)
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text must be (B, L) token ids with L <= {self.context_length}, got shape "
                             f"{tuple(tokens.shape)}")
        return F.pad(tokens, (0, self.context_length - tokens.shape[1]))  # zero padding, as the tokenizer pads

    def forward(self, image: torch.Tensor, text: torch.Tensor | Sequence | str | None = None) -> torch.Tensor:
        """Segment raw slices.

        Args:
            image: (N, 1, X, Y) raw grayscale intensities, any size.
            text: (N, L) or (1, L) token ids (tensor or list), a prompt string, or ``None`` for the bound prompt.

        Returns:
            logits (N, 1, X, Y) on the input grid.
        """
        tokens = self.as_tokens(text)
        x = image.as_subclass(torch.Tensor)
        batch = torch.stack([self.preprocess(s.float().cpu()).as_subclass(torch.Tensor) for s in x])  # (N,3,S,S)
        logits = self.model(batch.to(tokens.device), tokens)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).to(x.device)


class ExportNetwork(nn.Module):
    """CausalCLIPSeg traced for TorchScript, with the token ids as its second input: the ``ckpt_export`` target.

    ``torch.jit.script`` cannot compile the package's wrappers around open_clip's towers (``math.isqrt``,
    ``Sequence`` annotations, the ``TextFeatures`` dataclass), and MONAI's ``ckpt_export`` traces with one input only,
    so the model is traced here with ``(image, tokens)`` and wrapped in a scriptable module. The trace fixes the
    shapes: ``image`` ``(batch_size, 3, S, S)`` preprocessed as in :func:`get_slice_preprocessing` (S is the
    variant's ``image_size``) and ``text`` ``(batch_size, L)`` token ids from the package's tokenizer; any prompt
    works. Loading accepts CausalCLIPSeg's own state dict (``models/model.pt``).

    Args:
        network: the bundle network whose model is exported.
        batch_size: the batch size the export is traced for.
    """

    def __init__(self, network: BundleNetwork, batch_size: int = 1) -> None:
        super().__init__()
        model = network.model.eval()
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


# ---------------------------------------------------------------------------------------------------- training
class TrainingNetwork(nn.Module):
    """What the trainer (and DistributedDataParallel) calls: the min-max forward of a :class:`BundleNetwork`'s model.

    ``forward`` returns one tensor, the causal and confounder logits stacked as channels, so that MONAI's
    ``SupervisedTrainer`` and DDP (which only synchronises gradients through ``forward``) carry the adversarial
    term; :class:`StackedCausalSegLoss` splits them. The gradient-reversal coefficient is set each iteration by
    :class:`ReversalSchedule`. It shares the weights of ``network`` (the model is not copied).

    Args:
        network: the bundle network whose model is trained.
    """

    def __init__(self, network: BundleNetwork) -> None:
        super().__init__()
        self.model = network.model
        self.reversal = 0.0

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) preprocessed, text (B, L) token ids -> (B, 2, S, S): causal, confounder logits
        ((B, 1, S, S) without the causal module)."""
        output = self.model.forward_aux(image, text, reversal=self.reversal)
        if output.confounder_logits is None:
            return output.logits
        return torch.cat([output.logits, output.confounder_logits], dim=1)


class StackedCausalSegLoss(nn.Module):
    """:class:`~causalclipseg.training.losses.CausalSegLoss` on :class:`TrainingNetwork`'s stacked output (the total).

    Args are those of :class:`~causalclipseg.training.losses.CausalSegLoss`.
    """

    def __init__(self, lambda_dice: float = 0.5, lambda_bce: float = 0.5, confounder_weight: float = 1.0,
                 logit_bound: float = 5.0) -> None:
        super().__init__()
        self.loss = CausalSegLoss(lambda_dice, lambda_bce, confounder_weight, logit_bound)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """pred (B, 2, H, W) or (B, 1, H, W), label (B, 1, H, W) in {0, 1} -> scalar loss."""
        confounder = pred[:, 1:2] if pred.shape[1] == 2 else None
        return self.loss(CausalCLIPSegOutput(pred[:, :1], confounder, []), label).total


class ReversalSchedule:
    """Sets ``network.reversal`` before each iteration: the DANN ramp of the package's training engine.

    Args:
        network: a :class:`TrainingNetwork`.
        reversal_max: the final coefficient.
    """

    def __init__(self, network: TrainingNetwork, reversal_max: float = 0.5) -> None:
        if reversal_max < 0:
            raise ValueError(f"reversal_max must be >= 0, got {reversal_max}")
        self.network = network
        self.reversal_max = reversal_max

    def attach(self, engine: Engine) -> None:
        """Register with an ignite engine."""
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        total = max(1, engine.state.max_epochs * (engine.state.epoch_length or 1))
        self.network.reversal = reversal_coefficient(engine.state.iteration / total, self.reversal_max)


def optimizer_param_groups(network: BundleNetwork, lr: float, encoder_lr_scale: float = 1.0,
                           weight_decay: float = 1e-4) -> list[dict]:
    """AdamW parameter groups as in the package's training: the encoders at ``lr * encoder_lr_scale``."""
    return param_groups(network.model, lr, encoder_lr_scale, weight_decay)


# -------------------------------------------------------------------------------------------------- evaluation
class SegmentationScoresHandler:
    """Scores an evaluator's predictions under both protocols (per-image mean and dataset-level), logs them and
    writes ``metrics.json`` and the per-image ``scores.csv`` into ``output_dir``.

    Args:
        output_dir: where to write; ``None`` to only log.
        pred_key: probabilities ``(1, H, W)`` per item in the engine output (after decollation).
        label_key: labels, same shape.
        threshold: probability above which a pixel is lesion.
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, pred_key: str = "pred",
                 label_key: str = "label", threshold: float = 0.5) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.pred_key, self.label_key = pred_key, label_key
        self.scores = SegmentationScores(threshold)
        self.summary: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Register with an ignite engine."""
        engine.add_event_handler(Events.STARTED, lambda _: self.scores.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def update(self, engine: Engine) -> None:
        """Score the items of the last batch."""
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            pred, label = item[self.pred_key], item[self.label_key]
            name = Path(str(getattr(pred, "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ, ""))).name
            self.scores.update(pred.detach().cpu()[None].float(), label.detach().cpu()[None], names=[name])

    def write(self, engine: Engine) -> None:
        """Log both protocols and write the files."""
        summary = self.scores.summary()
        self.summary = summary.to_dict()
        logger.info("evaluation (%d images):\n%s", len(self.scores), summary)
        engine.state.metrics.update({k.replace("/", "_"): v for k, v in self.summary.items()})
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "metrics.json").write_text(json.dumps(self.summary, indent=2))
            self.scores.to_csv(self.output_dir / "scores.csv")
