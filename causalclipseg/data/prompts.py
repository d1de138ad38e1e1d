"""Prompt edits: laterality swap (for flip augmentation) and the prompt transforms used to probe a model.

Left and right in QaTa-COV19 prompts are the patient's. A horizontal flip of the image moves the patient's left
lung to the other side of the picture, so the words "left" and "right" must be swapped with it
(:func:`swap_laterality`). The same swap without a flip, or an empty prompt, measures how much a trained model
relies on the text (:data:`PROMPT_TRANSFORMS`, used by evaluation).
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["PROMPT_TRANSFORMS", "empty_prompt", "get_prompt_transform", "identity_prompt", "swap_laterality"]

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
