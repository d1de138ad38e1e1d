"""Segment names and colours derived from the prompt: short, single-line, and the same every time."""

from __future__ import annotations

import hashlib
import re

__all__ = ["MAX_NAME_LENGTH", "PALETTE", "segment_name", "segment_color"]

MAX_NAME_LENGTH = 40

# Distinct, saturated colours that read well over grey images (RGB in [0, 1]); red first, as lesions usually are.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.10, 0.10), (0.10, 0.65, 0.95), (0.95, 0.75, 0.10), (0.20, 0.80, 0.30),
    (0.80, 0.30, 0.90), (1.00, 0.50, 0.00), (0.00, 0.80, 0.75), (0.95, 0.40, 0.65),
    (0.55, 0.85, 0.10), (0.40, 0.45, 1.00), (0.75, 0.55, 0.30), (0.95, 0.95, 0.35),
)


def _normalise(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip()


def segment_name(prompt: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A segment name from the prompt: whitespace collapsed to single spaces, one line, at most ``max_length``
    characters, cut at a word boundary with an ellipsis when too long; trailing punctuation dropped.

    Raises:
        ValueError: if the prompt is empty or ``max_length`` is below 8.
    """
    if max_length < 8:
        raise ValueError(f"max_length must be at least 8, got {max_length}")
    text = _normalise(prompt).rstrip(" .,;:")
    if not text:
        raise ValueError("the prompt is empty: type what to segment, e.g. 'lesion in the lower left lung'")
    if len(text) <= max_length:
        return text
    cut = text[: max_length - 1]
    if " " in cut[max_length // 2:]:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip(" .,;:") + "\u2026"


def segment_color(prompt: str) -> tuple[float, float, float]:
    """A colour from :data:`PALETTE`, the same for the same prompt (case and spacing ignored) in every session.

    Raises:
        ValueError: if the prompt is empty.
    """
    key = _normalise(prompt).lower()
    if not key:
        raise ValueError("the prompt is empty: type what to segment, e.g. 'lesion in the lower left lung'")
    digest = hashlib.sha256(key.encode("utf-8")).digest()  # stable across runs, unlike hash()
    return PALETTE[int.from_bytes(digest[:4], "big") % len(PALETTE)]

