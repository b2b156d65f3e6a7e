"""Ctrl-C during training: finish the step, save a checkpoint, then stop.

A KeyboardInterrupt raised at an arbitrary point can land inside tqdm's lock and end in
"RuntimeError: cannot release un-acquired lock". So while `trainer.train()` runs, the
first SIGINT only sets a flag; `StopOnInterrupt` sees it at the end of the step and asks
the Trainer for a checkpoint and a stop; `train` raises KeyboardInterrupt once the
Trainer has returned (outside any bar). A second Ctrl-C interrupts at once.
See docs/training.md ("Interrupting").
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from transformers import TrainerCallback

_NOTICE = b"\nsalf: Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)\n"


class StopOnInterrupt(TrainerCallback):
    """Set by the SIGINT handler; stops training at the end of the current step."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None   # the step saved and stopped at

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        os.write(2, _NOTICE)   # not print: the handler may run while a bar holds the stream's lock

    @contextlib.contextmanager
    def catching_sigint(self):
        """Install the handler for the block (main thread only: elsewhere signals cannot be
        caught). A process started with SIGINT ignored (`nohup`, `cmd &` in a script) keeps
        ignoring it, as Python itself does: a Ctrl-C meant for the script is not for this run."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:   # None: a handler installed outside Python, which cannot be put back
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
