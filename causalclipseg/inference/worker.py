"""``causalclipseg worker``: a process that keeps the model loaded and segments one job per request.

For clients that segment often (the 3D Slicer module's local backend): starting Python, importing torch and
open_clip and loading the weights take seconds, a 2-D prediction milliseconds. The worker pays the start once.

Protocol, one UTF-8 line per message:

- **stdin**: the path of a job's ``request.json`` per line, as the Slicer module's job folder holds it
  (``TextPromptSegmentationLib/request.py``: ``input``, ``prompt_file``, ``output_dir``, ``prompt_side``, ``device``,
  ``threshold``, ``model``, ``model_config``, ``checkpoint``, ``explain``, ``flip_tta``). The file stays the record of
  what was asked.
- **stdout**: one JSON answer per request, ``{"request": PATH, "ok": true, "files": [...], "seconds": S}`` or
  ``{"request": PATH, "ok": false, "error": "one line"}``. Nothing else is written there: :func:`run` sends what
  Python or a library prints to stdout to stderr instead.
- **stderr**: the log (model loading, progress bars of volumes, tracebacks of unexpected errors).

A request runs what ``causalclipseg predict INPUT --prompt-file F --prompt-side S --output-dir O --device D
--threshold T --overwrite [--explain] [--flip-tta] [--model M] [--model-config J] [--checkpoint C]`` runs, through the
same :class:`~causalclipseg.inference.predictor.Predictor`; only the loaded model is kept between requests, one per
(model, model config file, checkpoint file, their modification times, device). A request that fails is answered
with its one-line error and the worker carries on. The worker exits after ``idle_timeout`` seconds without a
request, and when stdin closes (its client has gone).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..factory import DEFAULT_MODEL
from ..io.inputs import list_inputs
from ..registry import add_model_config
from ..tokenizer import read_prompt
from .predictor import Predictor, _one_line

__all__ = ["WorkerRequest", "PredictWorker", "serve", "run"]

# Errors a request's user causes (bad prompt, unreadable input, missing checkpoint): answered with their message
# alone. Anything else is answered with its type too, and its traceback goes to the log.
_REQUEST_ERRORS = (ValueError, TypeError, OSError)


def _field(record: dict, name: str, kinds: type | tuple[type, ...], default: object = ..., source: str = "") -> object:
    """``record[name]``, checked against ``kinds``; ``default`` when absent (required when no default is given;
    ``None`` allowed when the default is ``None``)."""
    value = record.get(name, default)
    if value is ...:
        raise ValueError(f"the request {source} lacks {name!r}")
    if value is None and default is None:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{name!r} in the request {source} must be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {value!r}")
    return value


class WorkerRequest:
    """One job, read from its ``request.json``.

    Args:
        path: the ``request.json`` file.

    Raises:
        ValueError: if the file cannot be read as a JSON object or lacks ``input``, ``prompt_file`` or
            ``output_dir``.
        TypeError: for a field of the wrong type (``threshold`` a number, ``explain`` a boolean, ...).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the request {self.path}: {_one_line(err)}") from err
        if not isinstance(record, dict):
            raise ValueError(f"the request {self.path} is not a JSON object")
        src = str(self.path)
        self.input = Path(_field(record, "input", str, source=src))
        self.prompt_file = Path(_field(record, "prompt_file", str, source=src))
        self.output_dir = Path(_field(record, "output_dir", str, source=src))
        self.prompt_side: str = _field(record, "prompt_side", str, "patient", src)
        self.device: str = _field(record, "device", str, "auto", src)
        self.threshold = float(_field(record, "threshold", (int, float), 0.5, src))
        self.model: str = _field(record, "model", str, None, src) or DEFAULT_MODEL
        self.model_config: str | None = _field(record, "model_config", str, None, src) or None
        self.checkpoint: str | None = _field(record, "checkpoint", str, None, src) or None
        self.explain: bool = _field(record, "explain", bool, False, src)
        self.flip_tta: bool = _field(record, "flip_tta", bool, False, src)


def _file_key(path: str | None) -> tuple[str | None, int | None]:
    """A file's resolved path and modification time, what a loaded model depends on (``None`` where unreadable:
    the loader then says what is wrong with it)."""
    if path is None:
        return None, None
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None
    return str(Path(path).resolve()), stamp


class PredictWorker:
    """Answers requests with a :class:`Predictor` kept per (model, model config, checkpoint, device).

    Args:
        max_models: how many loaded models to keep; the least recently used is dropped before another is loaded
            (a client that changes model or device rarely needs more than one).
        log: where loading messages go.

    Raises:
        ValueError: for ``max_models`` below 1.
    """

    def __init__(self, max_models: int = 1, log: Callable[[str], None] | None = None) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.max_models = max_models
        self.log = log if log is not None else lambda text: print(text, file=sys.stderr, flush=True)
        self._predictors: collections.OrderedDict[tuple, Predictor] = collections.OrderedDict()

    def predictor(self, model: str, checkpoint: str | None, device: str, model_config: str | None = None) -> Predictor:
        """The loaded predictor for these settings, loading it when needed.

        A checkpoint or model config file rewritten since it was loaded (a new training epoch) is loaded again.

        Args:
            model: the variant, registered or registered now from ``model_config``.
            checkpoint: its weights; ``None``: the shipped ones.
            device: where it runs.
            model_config: a model config file (or folder) to register first, as ``predict --model-config``.

        Raises:
            ValueError, FileNotFoundError: as :class:`Predictor` (unknown model, bad device, missing weights) and
                :func:`~causalclipseg.registry.add_model_config` (missing or invalid config).
        """
        key = (model, *_file_key(model_config), *_file_key(checkpoint), device)
        if key in self._predictors:  # its config was registered when it was loaded
            self._predictors.move_to_end(key)
            return self._predictors[key]
        if model_config is not None:  # before anything is dropped: a bad config leaves the kept model
            add_model_config(model_config)
        while len(self._predictors) >= self.max_models:
            self._predictors.popitem(last=False)  # before loading: never two models' memory at once
        start = time.perf_counter()
        self.log(f"loading model {model!r} ({checkpoint or 'shipped weights'}) on {device} ...")
        predictor = Predictor(model, checkpoint, device=device)
        predictor.inferer.progress = True  # the client reads the progress bar of a volume from stderr
        self.log(f"model loaded in {time.perf_counter() - start:.1f} s; kept for the next requests")
        self._predictors[key] = predictor
        return predictor

    def handle(self, request_file: str) -> dict:
        """Run one request; returns the answer (never raises for what a request can get wrong)."""
        start = time.perf_counter()
        try:
            request = WorkerRequest(request_file)
            text = read_prompt(None, request.prompt_file)
            predictor = self.predictor(request.model, request.checkpoint, request.device, request.model_config)
            predictor.configure(request.threshold, request.prompt_side, request.flip_tta)
            files: list[Path] = []
            for path in list_inputs(request.input):
                prediction = predictor.predict(path, text, explain=request.explain)
                files += predictor.write(prediction, request.output_dir, overwrite=True)
        except _REQUEST_ERRORS as err:
            return {"request": request_file, "ok": False, "error": _one_line(err)}
        except Exception as err:  # noqa: BLE001 - a bug in one request must not end the worker; the log has it
            traceback.print_exc(file=sys.stderr)
            return {"request": request_file, "ok": False, "error": f"{type(err).__name__}: {_one_line(err)}"}
        return {"request": request_file, "ok": True, "files": [str(f) for f in files],
                "seconds": round(time.perf_counter() - start, 3)}


def _read_lines(stream: TextIO, sink: queue.Queue) -> None:
    """Each line of ``stream`` into ``sink``, then ``None`` at its end."""
    try:
        for line in stream:
            sink.put(line)
    except (OSError, ValueError):  # the stream was closed under us
        pass
    finally:
        sink.put(None)


def serve(requests: TextIO, answers: TextIO, idle_timeout: float | None = None,
          worker: PredictWorker | None = None) -> int:
    """Answer each request line of ``requests`` on ``answers`` until ``requests`` ends or none comes for
    ``idle_timeout`` seconds (``None``: wait for ever). Returns the exit status, 0.

    Raises:
        ValueError: for an ``idle_timeout`` that is not positive.
    """
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError(f"idle_timeout must be positive seconds or None, got {idle_timeout}")
    worker = worker if worker is not None else PredictWorker()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(requests, lines), daemon=True, name="worker-stdin").start()
    while True:
        try:
            line = lines.get(timeout=idle_timeout)
        except queue.Empty:
            worker.log(f"idle for {idle_timeout:g} s: exiting")
            return 0
        if line is None:
            return 0  # the client closed the pipe: it has gone
        if line.strip():
            answers.write(json.dumps(worker.handle(line.strip())) + "\n")
            answers.flush()


def run(idle_timeout: float | None = None) -> int:
    """:func:`serve` stdin on stdout, with everything else that would reach stdout (prints, C libraries) sent to
    stderr, so that stdout holds answers only."""
    sys.stdout.flush()
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with answers:
        return serve(sys.stdin, answers, idle_timeout)
