"""Run a command in its own process group, read its output without blocking, cancel the whole process tree.

A Qt widget polls :meth:`ProcessRunner.poll` from a timer; a script calls :meth:`ProcessRunner.wait`. Output
is read by one thread per stream into a queue; carriage returns (tqdm progress bars) end a line too, so
progress arrives while it is drawn, not when the bar finishes. A long-lived process (the model worker of
:mod:`.worker`) gets a stdin pipe to send requests on (``stdin_pipe``, :meth:`ProcessRunner.send_line`).
"""

from __future__ import annotations

import collections
import enum
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["RunState", "RunUpdate", "ProcessFailedError", "PolledRun", "ProcessRunner", "BackgroundCall",
           "parse_progress", "wait_for"]

_TQDM_PERCENT = re.compile(r"(\d{1,3})%\|")
_ERROR_PREFIX = "error: "


class RunState(str, enum.Enum):
    """Where a run stands."""

    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        """Whether the run has ended, in any way."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


@dataclass
class RunUpdate:
    """What happened since the previous poll."""

    state: RunState
    lines: list[str] = field(default_factory=list)  # new output lines, stdout and stderr interleaved
    progress: float | None = None  # latest progress in [0, 1] reported in these lines, if any


class ProcessFailedError(RuntimeError):
    """The command exited with a non-zero status; the message is one readable line.

    Args:
        returncode: the exit status.
        reason: the command's own explanation (its last ``error: ...`` or last stderr line), or ``None``.
    """

    def __init__(self, returncode: int, reason: str | None) -> None:
        self.returncode = returncode
        self.reason = reason
        super().__init__(reason if reason else f"the segmentation process exited with status {returncode} and "
                                               "no message; see the log")


def parse_progress(line: str) -> float | None:
    """Progress in [0, 1] from a tqdm line (``predict:  40%|####      | 2/5``), else ``None``."""
    match = _TQDM_PERCENT.search(line)
    return min(int(match.group(1)), 100) / 100.0 if match else None


def _read_stream(stream: IO[bytes], name: str, sink: queue.Queue) -> None:
    """Put ``(name, line)`` for each line (ended by \\n or \\r) into ``sink``, then ``(name, None)`` at the end."""
    pending = b""
    try:
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"\r\n|\r|\n", pending)
            pending = parts.pop()
            for part in parts:
                if part.strip():
                    sink.put((name, part.decode("utf-8", errors="replace")))
        if pending.strip():
            sink.put((name, pending.decode("utf-8", errors="replace")))
    except (OSError, ValueError):  # the pipe was closed under us: the process is gone
        pass
    finally:
        sink.put((name, None))


def wait_for(run: Any, timeout: float | None = None, on_update: Callable[[RunUpdate], None] | None = None,
             interval: float = 0.05, what: str = "the run") -> RunState:
    """Poll ``run`` (anything with ``poll() -> RunUpdate``) until it ends.

    Args:
        timeout: seconds; ``None`` waits as long as it takes.
        on_update: called with each update that has lines or a new state.
        interval: seconds between polls.
        what: how the timeout message names the run.

    Raises:
        TimeoutError: if the run has not ended within ``timeout`` (it keeps running; cancel it).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        update = run.poll()
        if on_update is not None and (update.lines or update.state.done):
            on_update(update)
        if update.state.done or update.state is RunState.NOT_STARTED:
            return update.state
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} still running after {timeout} s")
        time.sleep(interval)


class PolledRun:
    """What a run that is polled has: its :attr:`state` as of the last :meth:`poll`, and :meth:`wait`, which polls
    until it ends. :class:`ProcessRunner` and the model worker's ``WorkerRun`` build on it; they set ``_state`` and
    name themselves in a timeout message with :attr:`what`."""

    _state = RunState.NOT_STARTED

    @property
    def state(self) -> RunState:
        """The state at the last poll."""
        return self._state

    @property
    def what(self) -> str:
        """How a timeout message names the run."""
        return "the run"

    def poll(self) -> RunUpdate:
        """New output, progress and the state; never blocks."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None, on_update: Callable[[RunUpdate], None] | None = None,
             interval: float = 0.05) -> RunState:
        """Poll until the run ends (see :func:`wait_for`).

        Args:
            timeout: seconds; ``None`` waits as long as it takes.
            on_update: called with each update that has lines or a new state.
            interval: seconds between polls.

        Raises:
            TimeoutError: if the run has not ended within ``timeout`` (it keeps running; cancel it).
        """
        return wait_for(self, timeout, on_update, interval, self.what)


class ProcessRunner(PolledRun):
    """One run of a command: start, poll, wait, cancel.

    The command gets its own session (POSIX) or process group (Windows) so that cancelling kills what it
    started too: workers, data loaders, a shell's children.

    Args:
        command: the program and its arguments.
        env: the environment; ``None`` inherits this process's. ``PYTHONUNBUFFERED=1`` is always added so
            that a Python child's output arrives as it is printed.
        cwd: working folder.
        progress_parser: maps an output line to progress in [0, 1] or ``None``.
        stdin_pipe: give the command a stdin pipe for :meth:`send_line` (else it reads nothing).
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
                 progress_parser: Callable[[str], float | None] = parse_progress, stdin_pipe: bool = False) -> None:
        if not command:
            raise ValueError("command is empty")
        self.command = [str(part) for part in command]
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.cwd = cwd
        self.progress_parser = progress_parser
        self.stdin_pipe = stdin_pipe
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 0
        self._exited_at: float | None = None
        self._cancelled = False
        self._state = RunState.NOT_STARTED
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        self.output: list[str] = []

    @property
    def what(self) -> str:
        """The program's name."""
        return os.path.basename(self.command[0])

    @property
    def pid(self) -> int | None:
        """The child's process id once started."""
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited."""
        return self._process.returncode if self._process else None

    @property
    def alive(self) -> bool:
        """Whether the child has been started and not yet exited (its last output may still be unread)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the command.

        Raises:
            RuntimeError: if already started.
            FileNotFoundError: if the program does not exist (with its path in the message).
        """
        if self._process is not None:
            raise RuntimeError("this run has already been started; make a new ProcessRunner")
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        try:
            stdin = subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL
            self._process = subprocess.Popen(self.command, stdin=stdin, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, **kwargs)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"cannot start {self.command[0]}: program not found") from err
        self._state = RunState.RUNNING
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            threading.Thread(target=_read_stream, args=(stream, name, self._queue), daemon=True,
                             name=f"ProcessRunner-{name}").start()
            self._open_streams += 1

    def send_line(self, text: str) -> None:
        """Write ``text`` and a newline to the command's stdin.

        Raises:
            RuntimeError: without ``stdin_pipe``, before start, or once the command has exited or closed its stdin.
            ValueError: if ``text`` holds a line break.
        """
        if self._process is None or self._process.stdin is None:
            raise RuntimeError("this run has no stdin pipe: start it with stdin_pipe=True")
        if "\n" in text or "\r" in text:
            raise ValueError(f"a line cannot contain a line break, got {text!r}")
        try:
            self._process.stdin.write(text.encode("utf-8") + b"\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as err:
            raise RuntimeError(f"cannot write to {os.path.basename(self.command[0])}: it has exited ({err})") from err

    def poll(self) -> RunUpdate:
        """New output and the current state; never blocks."""
        update = RunUpdate(self._state)
        if self._process is None or self._state.done:
            return update
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            update.lines.append(line)
            self.output.append(line)
            if name == "stderr":
                self.stderr_tail.append(line)
            progress = self.progress_parser(line)
            if progress is not None:
                update.progress = progress
        if self._process.poll() is not None:
            now = time.monotonic()
            self._exited_at = self._exited_at or now
            # A grandchild that outlives the child may keep the pipes open: do not wait for it forever.
            if self._open_streams == 0 or now - self._exited_at > 2.0:
                if self._cancelled:
                    self._state = RunState.CANCELLED
                else:
                    self._state = RunState.SUCCEEDED if self._process.returncode == 0 else RunState.FAILED
        update.state = self._state
        return update

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the command and everything it started: terminate, then kill what is left after ``grace`` s."""
        if self._process is None or self._state.done:
            return
        self._cancelled = True
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self._process.pid)], capture_output=True,
                           check=False)
        else:
            group = self._process.pid  # the session leader's pid is the group id
            self._signal_group(group, signal.SIGTERM)
            try:
                self._process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(group, signal.SIGKILL)  # whatever is left, grandchildren included
        try:
            self._process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._process.kill()

    @staticmethod
    def _signal_group(group: int, sig: int) -> None:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):  # the group is gone already
            pass

    def failure_reason(self) -> str | None:
        """The command's own explanation of a failure: its last ``error: ...`` line on stderr, else its last
        stderr line that is not a progress bar (a Python traceback ends with the exception), else ``None``."""
        lines = [line.strip() for line in self.stderr_tail if line.strip()]
        for line in reversed(lines):
            if line.startswith(_ERROR_PREFIX):
                return line[len(_ERROR_PREFIX):]
        for line in reversed(lines):
            if self.progress_parser(line) is None:
                return line
        return None

    def raise_for_status(self) -> None:
        """Raise if the run failed.

        Raises:
            ProcessFailedError: if the command exited with a non-zero status (and was not cancelled).
        """
        if self._state is RunState.FAILED:
            raise ProcessFailedError(self.returncode if self.returncode is not None else -1, self.failure_reason())


class BackgroundCall:
    """A blocking call (an HTTP request) run in a daemon thread, polled like :class:`ProcessRunner`.

    Cancelling abandons the call: its result is dropped when it arrives (a thread cannot be killed; the
    call's own timeout ends it).

    Args:
        function: what to call.
        args, kwargs: its arguments.
    """

    def __init__(self, function: Callable, *args, **kwargs) -> None:
        self._function, self._args, self._kwargs = function, args, kwargs
        self._done = threading.Event()
        self._result = None
        self._error: BaseException | None = None
        self._state = RunState.NOT_STARTED

    @property
    def state(self) -> RunState:
        """The state at the last poll."""
        return self._state

    def _run(self) -> None:
        try:
            self._result = self._function(*self._args, **self._kwargs)
        except Exception as err:  # noqa: BLE001 - handed to the caller by result()
            self._error = err
        finally:
            self._done.set()

    def start(self) -> None:
        """Start the call in its thread.

        Raises:
            RuntimeError: if already started.
        """
        if self._state is not RunState.NOT_STARTED:
            raise RuntimeError("this call has already been started; make a new BackgroundCall")
        self._state = RunState.RUNNING
        threading.Thread(target=self._run, daemon=True, name="BackgroundCall").start()

    def poll(self) -> RunUpdate:
        """The current state; never blocks."""
        if self._state is RunState.RUNNING and self._done.is_set():
            self._state = RunState.FAILED if self._error is not None else RunState.SUCCEEDED
        return RunUpdate(self._state)

    def wait(self, timeout: float | None = None) -> RunState:
        """Block until the call ends.

        Raises:
            TimeoutError: if it has not ended within ``timeout`` seconds.
        """
        if self._state is RunState.RUNNING and not self._done.wait(timeout):
            raise TimeoutError(f"the call is still running after {timeout} s")
        return self.poll().state

    def cancel(self) -> None:
        """Abandon the call."""
        if not self._state.done:
            self._state = RunState.CANCELLED

    def result(self) -> Any:
        """The function's return value.

        Raises:
            Exception: the function's own exception if it failed.
            RuntimeError: if the call has not succeeded (still running or cancelled).
        """
        if self.poll().state is RunState.FAILED:
            raise self._error
        if self._state is not RunState.SUCCEEDED:
            raise RuntimeError(f"no result: the call is {self._state.value}")
        return self._result
