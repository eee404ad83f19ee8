"""SIGTERM handled as Ctrl-C is, even where the main thread is blocked in C code.

SIGTERM is what torchrun sends the other ranks when one fails and what a scheduler sends on
preemption. Python runs a signal handler only between two bytecodes of the main thread, so a
main thread blocked in one long C call (a collective waiting for a rank that died, a CUDA
synchronize) would not see it until the call returned, and would be killed (SIGKILL) when the
sender's grace period ended, without a word. A watcher thread, woken through Python's signal
wakeup file descriptor, ends such a process itself after `grace` seconds (status 143). It
also ends one that took the signal but has not ended `stop_within` seconds later: a
Terminated raised inside a `__del__` or a generator's cleanup is printed ("Exception ignored")
and dropped, and such a process would go on, deaf to further SIGTERMs.
A forked child (a DataLoader worker) drops the wakeup descriptor it inherits, so that a
signal to the child is never taken for one to this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

STATUS = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


def _forget_in_child() -> None:
    """After a fork, in the child: its signals must not wake the parent's watcher."""
    if _installed:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:  # not the main thread of the child's interpreter
            pass


_installed = 0  # guards installed in this process
os.register_at_fork(after_in_child=_forget_in_child)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM; handled as Ctrl-C is, with status 143."""


def stop_line(e: KeyboardInterrupt) -> tuple[str, int]:
    """How an interruption is named, and the exit status it gives (SIGTERM 143, Ctrl-C 130)."""
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)", STATUS
    return "interrupted", 130


class SigtermGuard:
    """Installs the handler and its watcher (`install`), and puts back what was there
    (`uninstall`). Only the main thread can install it; an inherited SIG_IGN is respected.

    Args:
        grace: seconds the main thread has to take the signal before the watcher ends the
            process.
        stop_within: seconds, once it took the signal, before the watcher ends it anyway.
        last_checkpoint: what to name as the last checkpoint if the watcher has to end it (a
            trainer's; None for a program that keeps none).
    """

    def __init__(
        self,
        grace: float = 15.0,
        stop_within: float = 60.0,
        last_checkpoint: Callable[[], str] | None = None,
    ):
        self.grace, self.stop_within = grace, stop_within
        self.last_checkpoint = last_checkpoint
        self.taken = threading.Event()  # the main thread ran the handler
        self._done = threading.Event()  # uninstalled: the program is ending by itself
        self._previous = None
        self._old_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
            return False  # started with SIGTERM ignored (nohup-like): keep it so
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        global _installed
        _installed += 1
        self._watcher = threading.Thread(target=self._watch, name="sigterm-watch", daemon=True)
        self._watcher.start()
        return True

    def uninstall(self) -> None:
        if self._pipe is None:
            return
        previous = signal.SIG_DFL if self._previous is None else self._previous
        signal.signal(signal.SIGTERM, previous)  # None: the previous one was not from Python
        signal.set_wakeup_fd(self._old_fd)
        global _installed
        _installed -= 1
        self._done.set()
        r, w = self._pipe
        os.set_blocking(w, True)
        os.write(w, b"\0")  # wakes the watcher, which ends
        self._watcher.join()
        os.close(r)
        os.close(w)
        self._pipe = None

    def _handle(self, signum, frame) -> None:
        if self.taken.is_set():
            return  # a second SIGTERM while the first one is handled
        self.taken.set()
        raise Terminated()

    def _watch(self) -> None:
        r, _ = self._pipe
        while True:
            data = os.read(r, 64)  # one byte per signal Python caught: its number
            if not data or 0 in data:
                return
            if signal.SIGTERM not in data:
                continue
            if not self._wait(self.taken, self.grace):
                self._end(
                    f"the main thread did not take it within {self.grace:g} s (blocked in a "
                    "call, e.g. a collective waiting for a rank that stopped)"
                )
            if not self._wait(self._done, self.stop_within):
                self._end(
                    f"the run did not end within {self.stop_within:g} s of taking it (the "
                    "signal was lost in a cleanup)"
                )
            return

    def _wait(self, event: threading.Event, timeout: float) -> bool:
        """True once `event` is set, or the program ends by itself, within `timeout`."""
        end = time.monotonic() + timeout
        while not (event.is_set() or self._done.is_set()):
            if time.monotonic() > end:
                return False
            self._done.wait(0.05)
        return True

    def _end(self, why: str) -> None:
        kept = ""
        if self.last_checkpoint is not None:
            kept = f"; last checkpoint: {self.last_checkpoint()}; rerun with --resume to continue"
        sys.stderr.write(f"terminated (SIGTERM): {why}; ending now{kept}\n")
        sys.stderr.flush()
        os._exit(STATUS)
