"""Prompt edits, and the one home of laterality: which side "left" and "right" name, and the translation.

**Two conventions.** Clinicians name the *patient's* side: on a frontal X-ray in standard display (and on an axial
slice as Slicer shows it) the patient's left lung is on the image's right. QaTa-COV19's captions (the LViT
annotations, also MosMedData+) name the *viewer's* side instead: their "left" is the image's left, the patient's
right (measured on the train split: 503 of 517 unilateral "left" masks lie on the image's left half). Every input
reaches the model in display orientation (:mod:`causalclipseg.io.orientation`), so the two conventions differ by
exactly one swap of the words. Every prompt therefore comes with its convention (:data:`PROMPT_SIDES`): the front
doors (CLI, ``Predictor``, bundle, MONAI Label, Slicer) take the patient's side by default; each dataset layout
declares its captions' convention (:mod:`causalclipseg.data.datasets`); each model records the convention it was
trained with (``model.prompt_side``); and :func:`to_model_side` translates.

A horizontal flip of the image moves each lung to the other side of the picture, so the words "left" and "right"
must be swapped with it in either convention (:func:`swap_laterality`). The same swap without a flip, or an empty
prompt, measures how much a trained model relies on the text (:data:`PROMPT_TRANSFORMS`, used by evaluation).
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["PROMPT_SIDES", "PROMPT_TRANSFORMS", "check_prompt_side", "empty_prompt",
           "get_prompt_transform", "identity_prompt", "infection_extent", "names_a_side", "swap_laterality",
           "to_model_side"]

#: How a prompt names sides: ``patient`` (the patient's own left, as clinicians say) or ``viewer`` (the image's
#: left as displayed, as QaTa-COV19's captions say)
PROMPT_SIDES = ("patient", "viewer")

_LATERAL_WORD = re.compile(r"\b(left|right)\b", flags=re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def _match_case(template: str, word: str) -> str:
    """``word`` written in the case pattern of ``template`` (upper, capitalised or lower)."""
    if template.isupper():
        return word.upper()
    if template[0].isupper():
        return word.capitalize()
    return word


def swap_laterality(prompt: str) -> str:
    """Swap the whole words "left" and "right", keeping their case.

    "Lower left lung and upper Right lung" becomes "Lower right lung and upper Left lung". Words that merely
    contain them ("leftover", "bright") are kept; hyphenated forms ("left-sided") are swapped.

    Raises:
        TypeError: if ``prompt`` is not a ``str``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    return _LATERAL_WORD.sub(lambda m: _match_case(m.group(0), _SWAP[m.group(0).lower()]), prompt)


def check_prompt_side(value: object, name: str = "prompt_side") -> str:
    """``value`` if it is one of :data:`PROMPT_SIDES`.

    Raises:
        ValueError: naming ``name``, the value and the choices.
    """
    if value not in PROMPT_SIDES:
        raise ValueError(f"{name} must be one of {', '.join(PROMPT_SIDES)} (whose left 'left' means: the patient's "
                         f"or the viewer's), got {value!r}")
    return str(value)


def to_model_side(prompt: str, prompt_side: str, model_side: str) -> str:
    """``prompt``, whose sides follow ``prompt_side``, worded in the convention ``model_side`` the model learned.

    The conventions differ by one swap of "left" and "right" (images reach the model in display orientation, see
    the module docstring); the same convention leaves the prompt as it is.

    Raises:
        ValueError: if either side is not one of :data:`PROMPT_SIDES`.
        TypeError: if ``prompt`` is not a ``str``.
    """
    check_prompt_side(prompt_side)
    check_prompt_side(model_side, "model_side")
    return prompt if prompt_side == model_side else swap_laterality(prompt)


def names_a_side(prompt: str) -> bool:
    """Whether ``prompt`` says "left" or "right" (as whole words), so that its mask depends on the image's
    orientation."""
    return isinstance(prompt, str) and _LATERAL_WORD.search(prompt) is not None


# What infection_extent tells apart: QaTa-COV19's captions begin "unilateral ..." or "bilateral ...".
_EXTENT_WORD = re.compile(r"\b(unilateral|bilateral)\b", flags=re.IGNORECASE)


def infection_extent(prompt: str) -> str:
    """``unilateral`` or ``bilateral`` as the prompt's first such word says (whole words, any case), else
    ``unstated``: the groups the issue's targets and the evaluation's per-extent scores are given for."""
    match = _EXTENT_WORD.search(prompt) if isinstance(prompt, str) else None
    return match.group(1).lower() if match else "unstated"


def identity_prompt(prompt: str) -> str:
    """The prompt unchanged."""
    return prompt


def empty_prompt(prompt: str) -> str:
    """The empty prompt (the model sees no text; tokenise with ``allow_empty=True``)."""
    return ""


#: Prompt transforms for evaluation, by name. Named functions rather than lambdas so that they pickle into
#: data-loader workers.
PROMPT_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "none": identity_prompt,
    "swap": swap_laterality,
    "empty": empty_prompt,
}


def get_prompt_transform(name: str) -> Callable[[str], str]:
    """The prompt transform registered as ``name`` in :data:`PROMPT_TRANSFORMS`.

    Raises:
        ValueError: if ``name`` is not a registered name.
    """
    if name not in PROMPT_TRANSFORMS:
        raise ValueError(f"prompt_transform must be one of {sorted(PROMPT_TRANSFORMS)}, got {name!r}")
    return PROMPT_TRANSFORMS[name]
