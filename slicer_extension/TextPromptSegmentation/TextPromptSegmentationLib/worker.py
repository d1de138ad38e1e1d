"""The local backend's warm model: one ``causalclipseg worker`` process kept between runs.

Running ``causalclipseg predict`` for each Segment starts Python, torch and open_clip and loads the weights every
time (seconds) for a prediction that takes milliseconds on a 2-D image. Instead the first run starts one worker
process (``python -m causalclipseg.cli worker``, in its own process group like any :class:`~.runner.ProcessRunner`)
and sends it the job's ``request.json`` path on stdin; the worker answers one JSON line on stdout and keeps the
model for the next run. Its log and progress bars arrive on stderr like the predict command's.

- One worker per Slicer session: :func:`shared_worker`, keyed by interpreter, model, model config, checkpoint, device
  and idle timeout. A run with another key stops the worker and starts a new one.
- It exits by itself after ``idle_timeout`` seconds without a request (and when Slicer, holding its stdin, exits).
- :meth:`WorkerRun.cancel` ends the worker's whole process group, as cancelling a predict process does; the next run
  starts a new worker and says so in the log. A worker that died (crash, killed, idle exit) is replaced the same
  way, with the reason.
- A request that fails (a bad prompt, an unreadable input) is answered with its one-line error; the worker lives on.

Everything here is called from one thread (Slicer's main thread, or a script).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Mapping

from .request import load_request
from .runner import PolledRun, ProcessFailedError, ProcessRunner, RunState, RunUpdate

__all__ = ["DEFAULT_IDLE_TIMEOUT", "build_worker_command", "parse_answer", "ModelWorker", "WorkerRun",
           "shared_worker", "stop_shared_worker"]

DEFAULT_IDLE_TIMEOUT = 600.0  # seconds a worker waits for the next run before it exits (and frees its memory)


def build_worker_command(python: str | os.PathLike, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> list[str]:
    """``python -m causalclipseg.cli worker --idle-timeout S``.

    Raises:
        ValueError: for an ``idle_timeout`` that is not positive.
    """
    if not idle_timeout > 0:
        raise ValueError(f"idle_timeout must be positive seconds, got {idle_timeout}")
    return [str(python), "-m", "causalclipseg.cli", "worker", "--idle-timeout", f"{idle_timeout:g}"]


def parse_answer(line: str, request_file: str | os.PathLike) -> dict | None:
    """The worker's answer to ``request_file`` if ``line`` is one (a JSON object naming that request), else
    ``None``."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or answer.get("request") != str(request_file) or "ok" not in answer:
        return None
    return answer


def _ending(runner: ProcessRunner) -> str:
    """Why a worker process ended, in words: the signal that killed it, or its status and last line."""
    code = runner.returncode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    last = runner.failure_reason()
    if code == 0:
        return f"it exited: {last}" if last else "it exited"
    return f"it exited with status {code}" + (f": {last}" if last else "")


class ModelWorker:
    """The ``causalclipseg worker`` process of one client, started when first needed and replaced when it has
    ended or the settings it was started with change.

    Args:
        margin: a worker idle for longer than its idle timeout minus this fraction of it is replaced rather than sent
            a request it might exit before reading.
    """

    def __init__(self, margin: float = 0.02) -> None:
        self.margin = margin
        self._runner: ProcessRunner | None = None
        self._key: tuple | None = None
        self._idle_timeout = DEFAULT_IDLE_TIMEOUT
        self._idle_since = 0.0
        self._ended_by: str | None = None  # why this client stopped the process, when it did
        self._busy: WorkerRun | None = None

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs (it leads its own process group)."""
        return self._runner.pid if self._runner is not None and self._runner.alive else None

    def submit(self, python: str | os.PathLike, request_file: str | os.PathLike, env: Mapping[str, str] | None = None,
               idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> WorkerRun:
        """A run of the job ``request_file`` (from :func:`~.request.prepare_job`); call its ``start``.

        Args:
            python: the interpreter with the ``causalclipseg`` package.
            request_file: the job's ``request.json``.
            env: the worker's environment (see :func:`~.request.child_environment`); used when it starts.
            idle_timeout: seconds the worker waits for the next run before it exits.

        Raises:
            ValueError: for an invalid request file or ``idle_timeout``.
        """
        build_worker_command(python, idle_timeout)  # validates idle_timeout
        return WorkerRun(self, python, request_file, env, idle_timeout)

    def stop(self, reason: str = "stopped", grace: float = 3.0) -> None:
        """End the worker and its whole process group (terminate, then kill after ``grace`` s); ``reason`` is
        what the next run reports."""
        if self._runner is not None and self._runner.alive:
            self._ended_by = reason
            self._runner.cancel(grace)

    def _acquire(self, python: str, env: Mapping[str, str] | None, key: tuple, idle_timeout: float,
                 run: WorkerRun) -> tuple[ProcessRunner, list[str]]:
        """The running worker for ``key``, started when needed, and the lines to log about it.

        Raises:
            RuntimeError: if another run is under way.
            FileNotFoundError: if the interpreter does not exist.
        """
        if self._busy is not None and self._busy.state is RunState.RUNNING:
            raise RuntimeError("the model process is busy with another run; wait for it or cancel it")
        notes: list[str] = []
        if self._runner is not None:
            runner = self._runner
            pid = runner.pid
            idle = time.monotonic() - self._idle_since
            notes += runner.poll().lines  # what it logged since the last run (an idle exit says so)
            if not runner.alive:
                runner.wait(timeout=5, on_update=lambda update: notes.extend(update.lines))
                why = self._ended_by or _ending(runner)
                notes.append(f"The model process (pid {pid}) has ended ({why}); starting a new one, which loads the "
                             "model again.")
                self._runner = None
            elif key != self._key:
                self.stop("the interpreter, model, model config, checkpoint, device or idle timeout changed")
                notes.append(f"The interpreter, model, model config, checkpoint, device or idle timeout changed: the "
                             f"model process (pid {pid}) was stopped; starting a new one.")
                self._runner = None
            elif idle > self._idle_timeout * (1.0 - self.margin):
                self.stop(f"idle for {idle:.0f} s")
                notes.append(f"The model process (pid {pid}) was idle for {idle:.0f} s, about to exit by itself: "
                             "starting a new one.")
                self._runner = None
            else:
                notes.append(f"Using the running model process (pid {pid}): the model is loaded.")
        if self._runner is None:
            command = build_worker_command(python, idle_timeout)
            # A neutral working folder: `python -m causalclipseg.cli` would import a causalclipseg/ folder in Slicer's.
            runner = ProcessRunner(command, env=env, cwd=tempfile.gettempdir(), stdin_pipe=True)
            runner.start()
            self._runner, self._key, self._idle_timeout, self._ended_by = runner, key, idle_timeout, None
            self._idle_since = time.monotonic()
            notes.append(f"Started the model process (pid {runner.pid}): {' '.join(command)}. It loads the model "
                         f"now and keeps it for later runs; it exits after {idle_timeout:g} s unused.")
        self._busy = run
        return self._runner, notes

    def _answered(self) -> None:
        self._idle_since = time.monotonic()


class WorkerRun(PolledRun):
    """One job sent to a :class:`ModelWorker`, polled like a :class:`~.runner.ProcessRunner`: start, poll, wait,
    cancel, raise_for_status. Made by :meth:`ModelWorker.submit`.

    The first update's lines say which worker runs it (started now, reused, or replacing one that ended, and why).
    """

    def __init__(self, worker: ModelWorker, python: str | os.PathLike, request_file: str | os.PathLike,
                 env: Mapping[str, str] | None, idle_timeout: float) -> None:
        record = load_request(request_file)
        self.request_file = str(request_file)
        self.command = build_worker_command(python, idle_timeout)
        self._worker, self._env, self._idle_timeout = worker, env, idle_timeout
        self._key = (str(python), record.get("model"), record.get("model_config"), record.get("checkpoint"),
                     record["device"], idle_timeout)
        self._runner: ProcessRunner | None = None
        self._state = RunState.NOT_STARTED
        self._notes: list[str] = []
        self._answer: dict | None = None
        self._reason: str | None = None
        self.output: list[str] = []

    what = "the model process"

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self._runner.pid if self._runner is not None else None

    @property
    def answer(self) -> dict | None:
        """The worker's answer once it has come (``ok``, and ``files`` and ``seconds`` or ``error``), else ``None``."""
        return dict(self._answer) if self._answer is not None else None

    @property
    def files(self) -> list[str]:
        """The files the worker wrote, once the run has succeeded."""
        return list(self._answer.get("files", [])) if self._answer and self._answer.get("ok") else []

    def start(self) -> None:
        """Send the job to the worker, starting one when needed.

        Raises:
            RuntimeError: if already started, or another run is under way.
            FileNotFoundError: if the interpreter does not exist.
        """
        if self._state is not RunState.NOT_STARTED:
            raise RuntimeError("this run has already been started; submit the job again")
        self._runner, self._notes = self._worker._acquire(self.command[0], self._env, self._key, self._idle_timeout,
                                                          self)
        self._state = RunState.RUNNING
        try:
            self._runner.send_line(self.request_file)
        except RuntimeError:
            pass  # the worker has just died: poll sees it end and reports why

    def poll(self) -> RunUpdate:
        """New log lines, progress and the state; never blocks."""
        if self._state is not RunState.RUNNING:
            return RunUpdate(self._state)
        update = self._runner.poll()
        lines, self._notes = self._notes, []
        for line in update.lines:
            answer = parse_answer(line, self.request_file)
            if answer is None:
                lines.append(line)
            else:
                self._answer = answer
        self.output += lines
        if self._answer is not None:
            self._worker._answered()
            self._state = RunState.SUCCEEDED if self._answer["ok"] else RunState.FAILED
            self._reason = None if self._answer["ok"] else str(self._answer.get("error") or "no message")
        elif update.state.done:  # the worker ended without answering (a cancelled run does not poll it any more)
            self._state = RunState.FAILED
            self._reason = (f"the model process ended before answering ({_ending(self._runner)}); the next run starts "
                            "a new one")
        return RunUpdate(self._state, lines, update.progress)

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the run by ending the worker's whole process group; the next run starts a new worker."""
        if self._state is not RunState.RUNNING:
            return
        self._worker.stop("stopped by Cancel", grace)
        self._state = RunState.CANCELLED

    def failure_reason(self) -> str | None:
        """Why the run failed: the worker's one-line error, or how the worker ended."""
        return self._reason

    def raise_for_status(self) -> None:
        """Raise if the run failed.

        Raises:
            ProcessFailedError: with the worker's one-line error (a cancelled run is not an error).
        """
        if self._state is RunState.FAILED:
            code = self._runner.returncode if self._runner is not None else None
            raise ProcessFailedError(code if code is not None else -1, self._reason)


_shared: ModelWorker | None = None


def shared_worker() -> ModelWorker:
    """The session's one :class:`ModelWorker` (made on first use)."""
    global _shared
    if _shared is None:
        _shared = ModelWorker()
    return _shared


def stop_shared_worker() -> None:
    """End the session's worker, if one runs (its model's memory is freed)."""
    if _shared is not None:
        _shared.stop("stopped by the module")
