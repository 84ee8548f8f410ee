"""SIGINT/SIGTERM during training: finish the current step, write a checkpoint, then stop.

Used by the shared loop and by PPO's own loop, so Ctrl-C never loses more than one step.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads after each optimizer step, so the checkpoint it then writes
    is consistent. A second signal raises KeyboardInterrupt at once; checkpoint writes are atomic, so that
    cannot leave a corrupt one behind."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step (or iteration), then saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )
