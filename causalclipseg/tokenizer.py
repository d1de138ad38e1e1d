"""Prompt tokenisation: open_clip's CLIP BPE tokenizer with an explicit, logged truncation policy.

Prompt policy (:func:`validate_prompt`, then :class:`PromptTokenizer`), the same for the CLI, the Python API, the
bundle and training:

- refused with a ``ValueError`` naming the problem: a prompt that is empty or whitespace only; one with no letter
  or digit (only punctuation or symbols); one holding control characters (NUL, escape, ...; tab, newline and
  carriage return count as spaces), which the CLIP tokenizer would silently delete, gluing words together; one
  holding undecodable bytes (lone surrogates, as Python passes non-UTF-8 command-line bytes);
- accepted as given: any Unicode text, right-to-left scripts (Arabic, Hebrew) included, as the BPE is byte-level;
  since the models learned English captions, a prompt without a Latin letter logs a warning (once per tokenizer);
- truncated, with a warning logged once per prompt: a prompt needing more than ``context_length`` token slots
  keeps its start (the tokens past the limit are dropped, and everything past ``52 * context_length`` characters
  before encoding, so a 10,000-character prompt costs no more than a short one).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer

logger = logging.getLogger(__name__)

__all__ = ["PromptTokenizer", "read_prompt", "validate_prompt"]

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x9f]")  # C0/C1 controls but tab, newline, CR, VT, FF, FS-US
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_WORD = re.compile(r"[^\W_]")  # a letter or digit, any script
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
_LETTER = re.compile(r"[^\W\d_]")
#: the longest CLIP BPE token spans 25 characters: this many characters per slot always fill the context
_CHARS_PER_SLOT = 26


def validate_prompt(prompt: object, allow_empty: bool = False) -> str:
    """Return ``prompt`` if it is usable text, else raise (see the module docstring for the policy).

    Raises:
        TypeError: if ``prompt`` is not a ``str``.
        ValueError: if ``prompt`` holds control characters or undecodable bytes, or, unless ``allow_empty``, is
            empty, whitespace only, or has no letter or digit.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    if not allow_empty and not prompt.strip():
        raise ValueError(f"prompt must contain text, got {prompt!r} (empty or whitespace only)")
    control = _CONTROL.search(prompt)
    if control:
        raise ValueError(f"prompt contains the control character {control.group()!r} (U+{ord(control.group()):04X}) "
                         f"at position {control.start()}: remove it; prompts are plain text")
    surrogate = _SURROGATE.search(prompt)
    if surrogate:
        raise ValueError(f"prompt is not valid text: it holds undecodable bytes at position {surrogate.start()} "
                         f"(save prompt files as UTF-8)")
    if not allow_empty and not _WORD.search(prompt):
        raise ValueError(f"prompt must contain a word (a letter or a digit), got {prompt!r}")
    return prompt


def read_prompt(prompt: str | None, prompt_file: str | os.PathLike | None = None,
                file_option: str = "--prompt-file") -> str | None:
    """The prompt as the user gave it: the text of ``prompt_file`` (UTF-8, stripped) when given, else ``prompt``.

    Not validated here (see :func:`validate_prompt`), but a ``prompt`` that is the path of an existing file is
    refused: it is a prompt file passed as the prompt by mistake.

    Args:
        file_option: how the user names the prompt-file option, for the messages.

    Raises:
        ValueError: if the file cannot be read as UTF-8 text, or ``prompt`` names an existing file.
    """
    if prompt_file:
        try:
            return Path(prompt_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read {file_option.lstrip('-').replace('-', ' ')} {prompt_file}: {err}") from err
    if isinstance(prompt, str) and prompt.strip():
        try:
            names_a_file = len(prompt) < 4096 and Path(prompt.strip()).is_file()
        except (OSError, ValueError):  # not a possible path (NUL byte, too long)
            names_a_file = False
        if names_a_file:
            raise ValueError(f"prompt {prompt.strip()!r} is the name of a file: pass {file_option} {prompt.strip()} "
                             f"to read the prompt from it")
    return prompt


class PromptTokenizer:
    """CLIP BPE tokenizer with a fixed context length.

    open_clip truncates silently; segmentation prompts carry the location words at their end, so a
    truncated prompt can silently change the mask. This wrapper truncates the same way (keeping the
    start-of-text token, cutting the tail, ending with end-of-text) but logs a warning naming the
    prompt and both lengths. Prompts are validated first (:func:`validate_prompt`); the whole policy is in
    the module docstring.

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
        self.max_chars = 2 * _CHARS_PER_SLOT * context_length  # longer prompts are cut before encoding
        self._warned_script = False
        self._warned: set[int] = set()

    def _first_time(self, prompt: str) -> bool:
        """Whether ``prompt`` is seen for the first time (its warning is logged once: a folder of files, or
        every epoch, would repeat it)."""
        key = hash(prompt)  # not the prompt: it may be megabytes long
        if key in self._warned:
            return False
        if len(self._warned) < 100_000:
            self._warned.add(key)
        return True

    def _bounded(self, prompt: str) -> tuple[str, bool]:
        """``prompt``, cut to :attr:`max_chars` characters (at a space when one is near) if longer; and whether
        it was cut. The cut text still fills every token slot, so the tokens are those of the whole prompt."""
        if len(prompt) <= self.max_chars:
            return prompt, False
        text = " ".join(prompt.split())
        if len(text) <= self.max_chars:
            return text, False
        cut = text.rfind(" ", 0, self.max_chars + 1)
        return text[: cut if cut >= self.max_chars // 2 else self.max_chars], True

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
            ValueError: if a prompt breaks the policy of :func:`validate_prompt` (empty or whitespace only is
                accepted with ``allow_empty``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("prompts must hold at least one prompt, got an empty sequence")
        texts = []
        for prompt in prompts:
            validate_prompt(prompt, allow_empty)
            text, cut = self._bounded(prompt)
            needed = self.num_tokens(text)
            if (cut or needed > self.context_length) and self._first_time(prompt):
                if cut:
                    logger.warning("prompt truncated from %d characters (more than %d tokens) to %d tokens "
                                   "(context_length): %.80r", len(prompt), needed, self.context_length, prompt)
                else:
                    logger.warning("prompt truncated from %d to %d tokens (context_length): %.80r",
                                   needed, self.context_length, prompt)
            if not self._warned_script and _LETTER.search(prompt) and not _LATIN.search(prompt):
                self._warned_script = True
                logger.warning("prompt has no Latin letter: the model learned English prompts, so its mask may not "
                               "follow this one: %.80r", prompt)
            texts.append(text)
        return self._bpe(texts, context_length=self.context_length)

    def decode(self, tokens: torch.Tensor) -> str:
        """Text of one (L,) token-id row, without special tokens and padding."""
        ids = [int(t) for t in tokens if int(t) not in (self.pad_id, self.sot_id, self.eot_id)]
        return self._bpe.decode(ids).strip()
