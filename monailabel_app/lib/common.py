"""What the app's tasks share: the error a request causes, and the uploads MONAI Label leaves behind."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["BadRequestError", "is_upload", "remove_upload", "describe_source", "conf_path"]

# MONAI Label's /infer endpoint writes an uploaded image to tempfile.NamedTemporaryFile(suffix=<upload's suffixes>).name
_UPLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}")


class BadRequestError(ValueError):
    """The request cannot be served because of what it asks (HTTP 400); the message names the input and the rule."""


def is_upload(path: object) -> bool:
    """Whether ``path`` is a file MONAI Label's ``/infer`` endpoint wrote for an uploaded image."""
    if not isinstance(path, str) or not path:
        return False
    p = Path(path)
    return p.parent == Path(tempfile.gettempdir()) and bool(_UPLOAD_NAME.fullmatch(p.name.split(".", 1)[0]))


def remove_upload(path: object) -> None:
    """Delete an uploaded image that MONAI Label would only delete after a successful answer."""
    if is_upload(path):
        Path(path).unlink(missing_ok=True)


def describe_source(message: str, source: object) -> str:
    """``message`` with an upload's temporary path replaced by what the user sent ("the uploaded .png image")."""
    if is_upload(source):
        suffix = "".join(Path(source).suffixes)
        message = message.replace(f" {str(source)!r}", "").replace(f' "{source}"', "")  # the reader's own quote
        return message.replace(str(source), f"the uploaded {suffix} image" if suffix else "the uploaded image")
    return message


def conf_path(conf: dict, key: str, default: Path, must_exist: bool = True) -> Path:
    """A path from the app's ``--conf key value``, resolved; ``default`` when the key is absent or empty.

    Raises:
        FileNotFoundError: if ``must_exist`` and the path does not exist (the message names the option).
    """
    value = conf.get(key)
    path = Path(os.path.expanduser(value)).resolve() if value else default.resolve()
    if must_exist and not path.exists():
        option = f"--conf {key} {value}" if value else f"the default {key}"
        raise FileNotFoundError(f"{option}: {path} does not exist")
    return path
