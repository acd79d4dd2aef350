"""Ctrl-C and SIGTERM as exceptions that are not lost.

Python raises KeyboardInterrupt wherever the main thread is when the signal arrives. Inside a
finalizer or a lock's release (a DataLoader worker's queue, logging) the exception is printed
as "Exception ignored in ..." and dropped, and the command runs on to its end. The handlers
installed here also record the stop, and long loops call `raise_if_stopped()` between steps,
so that a stop dropped that way is raised again at the next step."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

_stop: type[KeyboardInterrupt] | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `timeout`, torchrun stopping the other processes when
    one fails) raised as an exception, so that lock files and temporary outputs are removed
    on the way out as after Ctrl-C; the default action ends the process on the spot."""


def install() -> Callable[[], None]:
    """Handle SIGINT and SIGTERM (and quiet other threads' errors once a stop is asked for);
    returns what puts the previous handlers back. Does nothing outside the main thread of
    the interpreter, where signals cannot be handled."""
    global _stop
    _stop = None
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    handlers = {signal.SIGINT: _on_interrupt, signal.SIGTERM: _on_terminate}
    # a signal the process was started ignoring (`cmd &` from a script ignores SIGINT) stays
    # ignored: the caller chose that
    previous = {number: signal.getsignal(number) for number in handlers
                if signal.getsignal(number) != signal.SIG_IGN}
    previous_hook = threading.excepthook
    for number in previous:
        signal.signal(number, handlers[number])
    threading.excepthook = _quiet_after_a_stop(previous_hook)

    def restore() -> None:
        global _stop
        for number, handler in previous.items():
            _put_back(number, handler)
        threading.excepthook = previous_hook
        _stop = None

    return restore


def raise_if_stopped() -> None:
    """Raise the stop asked for, if one was: again, where the first raise was dropped."""
    if _stop is not None:
        raise _stop()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the block (a few renames that belong together): a
    signal sent meanwhile is handled right after it, as it would have been. Held by the
    Python handlers, not the thread's signal mask: with other threads running, the kernel
    hands a process's signal to one of them, and Python runs its handler at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: caught.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            _put_back(number, handler)
        if caught:
            _deliver(caught[0], previous[caught[0]])


def _deliver(signum: int, handler) -> None:
    """What `handler` does with the signal: call it (raise KeyboardInterrupt, Terminated),
    nothing when ignored, the default action (end the process) otherwise."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


@contextlib.contextmanager
def interrupts_ignored_by_new_processes() -> Iterator[None]:
    """Processes started in the block (worker pools) ignore Ctrl-C from their first
    instruction: a spawned Python keeps an ignored SIGINT, where a handler set once it runs
    comes too late for a worker still importing its modules. A terminal sends Ctrl-C to the
    whole process group; the main process alone should stop, and end its workers. The block
    itself ignores Ctrl-C for the milliseconds it takes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        _put_back(signal.SIGINT, previous)


def _put_back(number: int, handler) -> None:
    """Restore a handler; None stands for one set outside Python, which cannot be put back
    from here: the default action is."""
    signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _on_interrupt(signum: int, frame: object) -> None:
    global _stop
    _stop = KeyboardInterrupt
    raise KeyboardInterrupt


def _on_terminate(signum: int, frame: object) -> None:
    global _stop
    # a process group's SIGTERM also ends DataLoader workers: torch's SIGCHLD handler would
    # then raise "worker killed" over this stop's one line. Replaced by a Python handler
    # that does nothing, not by SIG_DFL: a SIGCHLD that came in with the SIGTERM, still
    # pending for Python, would find no Python handler and be printed as "Signal 17 ignored
    # due to race condition"
    with contextlib.suppress(ValueError, AttributeError):
        signal.signal(signal.SIGCHLD, _child_ended)
    _stop = Terminated
    raise Terminated


def _child_ended(signum: int, frame: object) -> None:
    """A worker that ended after a stop: the stop is what is reported."""


def _quiet_after_a_stop(previous: Callable) -> Callable:
    """A helper thread that fails after the stop (multiprocessing's resource sharer, when a
    worker is gone) fails because of it: its traceback would bury the stop's one line."""
    def hook(args: threading.ExceptHookArgs) -> None:
        if _stop is None:
            previous(args)

    return hook
