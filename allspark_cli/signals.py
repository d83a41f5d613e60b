"""Graceful stop on Ctrl-C (SIGINT), SIGTERM and SIGHUP: the loop finishes its step, saves, then stops.

A core module (beside errors.py and fileio.py) because both the training engine and the dataset
builders of `data_tools` (their conversion pool) use it, and `data_tools` does not import the engine.

Schedulers stop a job by signalling its whole process group (`timeout`, Slurm's scancel and time
limit, `docker stop`, Kubernetes: SIGTERM; a closed terminal: SIGHUP; Ctrl-C: SIGINT), so the data
loader workers receive the signal too. Workers ignore these signals (`ignore_stop_signals`: every
DataLoader's `worker_init_fn`, and the initializer of prepare's conversion pool): only the main
process decides, and the workers end when it closes its loaders or pool, instead of dying first
and turning the stop into a loader error.

While installed, the first signal only sets `requested`; the training loop checks it after each
step (all ranks agree through an all-reduce), saves last.pt and raises Interrupted; `eval` and
`predict` check it after each batch (predict's finished outputs are kept, eval writes nothing;
predict says at once that it is stopping, through `on_request`);
prepare's conversion stage checks it as results come in and stops after the chunks in progress.
Around every command, `stop_signals_interrupt` turns a stop elsewhere (startup, dataset checks)
into the one-line "interrupted" (exit 130). A second
Ctrl-C falls back to Python's default and interrupts at once. Handlers can only be installed from
the main thread; elsewhere (e.g. a worker thread) installing is a no-op.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Signals whose default action ends the process silently (exit 128 + n); SIGINT already raises.
_SILENT_STOPS = (signal.SIGTERM, signal.SIGHUP)


def ignore_stop_signals(worker_id: int = 0) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """In a loader or pool worker: leave stop signals to the main process (see the module docstring)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _interrupt_in(process_id: int) -> Callable[[int, object], None]:
    """A handler raising KeyboardInterrupt in process `process_id` only. A process forked from it
    (a multiprocessing pool worker, a loader worker before its worker_init_fn) inherits the handler;
    there the signal does what it would by default (end the worker quietly, as Pool.terminate
    expects), instead of printing a KeyboardInterrupt traceback from the worker."""

    def handle(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        if os.getpid() == process_id:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handle


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, while the block runs.

    For commands without a loop that stops gracefully everywhere (`prepare` outside its conversion
    stage): the stop becomes the command's one-line "interrupted" message with exit code 130
    instead of a silent exit 143 / 129. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _interrupt_in(os.getpid())
    previous = {sig: signal.signal(sig, handler) for sig in _SILENT_STOPS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_resource_tracker_immune_to_stops() -> None:
    """Starts multiprocessing's resource tracker (if not running) with the stop signals blocked.

    The tracker is one helper process per program, in the program's process group. It ignores
    SIGINT and SIGTERM itself but not SIGHUP: a SIGHUP sent to the group would kill it, a new one
    would be started, and that one prints a KeyError traceback for every semaphore of the old.
    A blocked signal stays blocked across exec, so the tracker started here never sees SIGHUP; in
    this process a signal that arrives meanwhile is delivered when the mask is restored."""
    if threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequest:
    """`requested` turns True at the first stop signal; `on_request` (if given) is called then, at
    once, so that a command can say it is stopping (a loop may take a while to reach its check)."""

    def __init__(self, on_request: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.on_request = on_request

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = not self.requested
        self.requested = True
        if first and self.on_request is not None:
            self.on_request()

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
