"""Stopping a training run cleanly on SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler
sends before it kills a job).

Python's default turns Ctrl-C into a KeyboardInterrupt wherever the program happens to be, and
SIGTERM ends the process at once: either way the steps since the last checkpoint are lost.
Inside `StopSignals` the first of these signals only raises a flag; the training loop looks at
it after every step, saves a checkpoint and raises `Interrupted`. A second signal means "stop
now": it raises KeyboardInterrupt at once (a checkpoint being written is then left as it was
before, since saves are atomic), and the run exits with 130 whichever signal it was.

    with StopSignals() as stop:
        for step in ...:
            ...
            if stop.requested:
                save(); raise Interrupted(stop.signal_name, ...)
"""
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped at a signal after saving its state; `exit_code` is the shell's
    convention for that signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number


class StopSignals:
    """Within the `with` block, SIGINT and SIGTERM set `requested` (and `signal_number`)
    instead of interrupting; a second one raises KeyboardInterrupt. Outside the main thread
    (where Python cannot install handlers) it changes nothing and `requested` stays False."""

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    @property
    def requested(self):
        return self.signal_number is not None

    @property
    def signal_name(self):
        return signal.Signals(self.signal_number).name if self.requested else None

    def _handle(self, signum, frame):
        if self.requested:                  # the second signal: the user means it
            raise KeyboardInterrupt
        self.signal_number = signum
        # said at once, above the progress bar: the step (or the epoch's validation) may take a while
        from tqdm import tqdm
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, with a save "
                   f"(once more to stop at once, from the last save)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            if handler is not None:           # None: a handler not installed from Python
                signal.signal(s, handler)
        self._previous = {}
        return False
