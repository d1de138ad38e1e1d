"""A small MONAI Label client (standard library only) whose every failure is one readable sentence.

It speaks the two endpoints the module needs: ``GET /info/`` (the app and its models) and
``POST /infer/{model}?output=image`` with a multipart body holding ``params`` (JSON: the prompt, ``prompt_side``,
device, threshold, ``flip_tta``; see ``SegmentationRequest.server_params``) and ``file`` (the image), answered by
the label file, or by an explanation map when ``params`` has ``result_map`` (one file per request:
:func:`infer_maps` asks for each). The official ``monailabel`` client is not needed.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ServerError", "normalise_url", "info", "available_models", "served_maps", "infer", "infer_maps"]

_HINT_START = "start it with `monailabel start_server --app monailabel_app --studies DATA`"


class ServerError(RuntimeError):
    """The MONAI Label server could not be reached or refused the request; the message says which and why."""


def normalise_url(url: str) -> str:
    """``host:port`` or ``http(s)://host:port/`` as ``http(s)://host:port`` (no trailing slash).

    Raises:
        ValueError: if the URL is empty or not http(s).
    """
    url = url.strip()
    if not url:
        raise ValueError("the MONAI Label server URL is empty, e.g. http://127.0.0.1:8000")
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the MONAI Label server URL must look like http://host:port, got {url!r}")
    return url.rstrip("/")


def _server_detail(body: bytes) -> str:
    """The server's own explanation: FastAPI's ``{"detail": ...}`` or the first line of the body."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        detail = json.loads(text).get("detail", text)
    except (json.JSONDecodeError, AttributeError):
        detail = text
    if isinstance(detail, list):  # request validation errors: [{"loc": [...], "msg": "..."}]
        detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
    detail = re.sub(r"\s+", " ", str(detail)).strip()
    return detail[:300] if detail else "no message"


def _request(request: urllib.request.Request, url: str, timeout: float, action: str) -> tuple[bytes, Any]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read(), response.headers
    except urllib.error.HTTPError as err:
        detail = _server_detail(err.read() if err.fp else b"")
        raise ServerError(f"the MONAI Label server at {url} refused to {action}: HTTP {err.code} {err.reason}: "
                          f"{detail}") from err
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, TimeoutError):
            raise ServerError(f"the MONAI Label server at {url} did not answer within {timeout:g} s while asked to "
                              f"{action}; it may be busy or the URL may point elsewhere") from err
        if isinstance(reason, ConnectionRefusedError):
            raise ServerError(f"cannot reach the MONAI Label server at {url}: connection refused. Is it running? "
                              f"({_HINT_START})") from err
        raise ServerError(f"cannot reach the MONAI Label server at {url}: {reason}") from err
    except TimeoutError as err:
        raise ServerError(f"the MONAI Label server at {url} did not answer within {timeout:g} s while asked to "
                          f"{action}; it may be busy or the URL may point elsewhere") from err
    except (ConnectionError, OSError) as err:
        raise ServerError(f"the connection to the MONAI Label server at {url} broke while asked to {action}: "
                          f"{err}") from err


def info(url: str, timeout: float = 10.0) -> dict:
    """``GET /info/``: the app's name, version, models and their parameters.

    Raises:
        ServerError: if the server is down, slow, answers an HTTP error or something that is not JSON.
        ValueError: for a malformed URL.
    """
    base = normalise_url(url)
    body, _ = _request(urllib.request.Request(f"{base}/info/", headers={"Accept": "application/json"}), base,
                       timeout, "describe itself (/info/)")
    try:
        answer = json.loads(body)
    except json.JSONDecodeError as err:
        raise ServerError(f"{base} answered /info/ with something that is not JSON: is it a MONAI Label server?") \
            from err
    if not isinstance(answer, dict):
        raise ServerError(f"{base} answered /info/ with {type(answer).__name__}, not an object")
    return answer


def available_models(server_info: Mapping[str, Any]) -> list[str]:
    """The model names an ``/info/`` answer lists."""
    models = server_info.get("models", {})
    return sorted(models) if isinstance(models, Mapping) else []


def _multipart(fields: Mapping[str, str], file_field: str, file_path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + value.encode("utf-8") + b"\r\n")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                 f'filename="{file_path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                 + file_path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _result_suffix(headers: Any, fallback: str) -> str:
    disposition = headers.get("Content-Disposition", "") if headers else ""
    match = re.search(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', disposition)
    name = urllib.parse.unquote(match.group(1)).lower() if match else ""
    for suffix in (".nii.gz", ".nii", ".nrrd", ".seg.nrrd"):
        if name.endswith(suffix):
            return ".nrrd" if suffix == ".seg.nrrd" else suffix
    return fallback


def infer(url: str, model: str, image_path: str | os.PathLike, params: Mapping[str, Any],
          output_dir: str | os.PathLike, timeout: float = 300.0, name: str = "label") -> Path:
    """``POST /infer/{model}?output=image`` with the image uploaded; writes the returned label file.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        model: a model name from :func:`available_models`.
        image_path: the image to upload (NIfTI or NRRD).
        params: request parameters, e.g. ``{"prompt": "...", "prompt_side": "patient", "device": "cuda"}``.
        output_dir: folder for the result, written as ``name`` + the server's suffix.
        timeout: seconds to wait for the server at each step (connect, each read).
        name: the result file's name without its suffix.

    Returns:
        The path of the label file.

    Raises:
        ServerError: if the server is down, slow, answers an HTTP error or no label image.
        FileNotFoundError: if the image is missing.
        ValueError: for a malformed URL or an empty model name.
    """
    base = normalise_url(url)
    if not model.strip():
        raise ValueError("the MONAI Label model name is empty")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"image not found: {image_path}")
    body, content_type = _multipart({"params": json.dumps(dict(params))}, "file", image_path)
    endpoint = f"{base}/infer/{urllib.parse.quote(model.strip(), safe='')}?output=image"
    request = urllib.request.Request(endpoint, data=body, method="POST",
                                     headers={"Content-Type": content_type, "Accept": "application/octet-stream"})
    answer, headers = _request(request, base, timeout, f"run model {model!r}")
    if "json" in (headers.get("Content-Type", "") if headers else ""):
        raise ServerError(f"the MONAI Label server at {base} ran {model!r} but returned no label image: "
                          f"{_server_detail(answer)}")
    if not answer:
        raise ServerError(f"the MONAI Label server at {base} ran {model!r} but returned an empty file")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sniffed = ".nrrd" if answer[:4] == b"NRRD" else ".nii.gz" if answer[:2] == b"\x1f\x8b" else ".nii"
    suffix = _result_suffix(headers, sniffed)
    target = out / f"{name}{suffix}"
    target.write_bytes(answer)
    return target


def served_maps(server_info: Mapping[str, Any], model: str) -> list[str] | None:
    """The ``result_map`` choices an ``/info/`` answer lists for ``model``; ``None`` when it lists none."""
    models = server_info.get("models")
    model_info = models.get(model) if isinstance(models, Mapping) else None
    config = model_info.get("config") if isinstance(model_info, Mapping) else None
    choices = config.get("result_map") if isinstance(config, Mapping) else None
    return [str(choice) for choice in choices] if isinstance(choices, list) else None


def infer_maps(url: str, model: str, image_path: str | os.PathLike, params: Mapping[str, Any],
               output_dir: str | os.PathLike, maps: Mapping[str, str] | None = None,
               timeout: float = 300.0) -> dict[str, Path]:
    """The mask (:func:`infer`) and, one more request each, the explanation maps of ``maps`` that the served model
    gives (its ``result_map`` choices in ``/info/``: a model without a causal module has no causal mask; a server
    that lists none is asked for every map).

    Args:
        maps: key -> the server's ``result_map`` value (e.g. ``{"causal mask": "causal_mask"}``); none by default.
        url, model, image_path, params, output_dir, timeout: as :func:`infer`.

    Returns:
        ``{"mask": path}`` and a path for each key of ``maps`` asked for (files ``label``, ``map0``, ``map1``, ...).

    Raises:
        ServerError, FileNotFoundError, ValueError: as :func:`infer`; a server that cannot make a map says why.
    """
    files = {"mask": infer(url, model, image_path, params, output_dir, timeout)}
    if maps:
        offered = served_maps(info(url, timeout), model)
        maps = {key: value for key, value in maps.items() if offered is None or value in offered}
    for index, (key, result_map) in enumerate((maps or {}).items()):
        files[key] = infer(url, model, image_path, {**params, "result_map": result_map}, output_dir, timeout,
                           name=f"map{index}")
    return files
