"""Prompt tokenisation: open_clip's CLIP BPE tokenizer with an explicit, logged truncation policy."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

logger = logging.getLogger(__name__)

__all__ = ["PromptTokenizer", "validate_prompt"]


def validate_prompt(prompt: object, allow_empty: bool = False) -> str:
    """Return ``prompt`` if it is usable text, else raise.

    Raises:
        TypeError: if ``prompt`` is not a ``str``.
        ValueError: if ``prompt`` is empty or whitespace only and ``allow_empty`` is false.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    if not allow_empty and not prompt.strip():
        raise ValueError(f"prompt must contain text, got {prompt!r} (empty or whitespace only)")
    return prompt


class PromptTokenizer:
    """CLIP BPE tokenizer with a fixed context length.

    open_clip truncates silently; segmentation prompts carry the location words at their end, so a
    truncated prompt can silently change the mask. This wrapper truncates the same way (keeping the
    start-of-text token, cutting the tail, ending with end-of-text) but logs a warning naming the
    prompt and both lengths.

    Args:
        context_length: number of token slots, including start- and end-of-text. QaTa-COV19 captions
            need at most 22.
    """

    def __init__(self, context_length: int = 32) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one word, end), got {context_length}")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.pad_id = 0
        self.sot_id = self._bpe.sot_token_id
        self.eot_id = self._bpe.eot_token_id

    def num_tokens(self, prompt: str) -> int:
        """Number of token slots ``prompt`` needs, start- and end-of-text included."""
        return len(self._bpe.encode(prompt)) + 2

    def __call__(self, prompts: str | Sequence[str], allow_empty: bool = False) -> torch.Tensor:
        """Tokenise one prompt or a batch.

        Args:
            prompts: a prompt or a sequence of prompts.
            allow_empty: accept empty prompts (used to measure how much a model relies on the text).

        Returns:
            (N, context_length) int64 token ids, padded with 0.

        Raises:
            TypeError: if a prompt is not a ``str``.
            ValueError: if a prompt is empty or whitespace only (unless ``allow_empty``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("prompts must hold at least one prompt, got an empty sequence")
        for prompt in prompts:
            validate_prompt(prompt, allow_empty)
            needed = self.num_tokens(prompt)
            if needed > self.context_length:
                logger.warning(
                    "prompt truncated from %d to %d tokens (context_length): %.80r",
                    needed, self.context_length, prompt,
                )
        return self._bpe(list(prompts), context_length=self.context_length)

    def decode(self, tokens: torch.Tensor) -> str:
        """Text of one (L,) token-id row, without special tokens and padding."""
        ids = [int(t) for t in tokens if int(t) not in (self.pad_id, self.sot_id, self.eot_id)]
        return self._bpe.decode(ids).strip()
