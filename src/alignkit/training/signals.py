"""SIGINT/SIGTERM during training: finish the current step, write a checkpoint, then stop.

Used by the shared loop and by the online engine (ppo, online-dpo), so Ctrl-C never loses more than one step.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from alignkit.errors import TrainingInterrupted
from alignkit.training.checkpoint import newest_intact_checkpoint


class StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads after each optimizer step, so the checkpoint it then writes
    is consistent. A second signal raises KeyboardInterrupt at once, wherever the loop is (inside a checkpoint
    write too: writes are atomic, so that leaves no corrupt one behind); the loop turns it into
    ``stopped_at_once``'s error, which names the newest intact checkpoint on disk."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.second: int | None = None  # the signal that stopped the run at once
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
            self.second = signum
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step (or iteration), then saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )


def stopped_at_once(
    signals: StopSignals, checkpoints_dir: Path, last_checkpoint: str | None
) -> TrainingInterrupted:
    """The error for a run stopped by a KeyboardInterrupt (a second signal, possibly in the middle of writing a
    checkpoint): it names the newest complete checkpoint on disk that matches its manifest, which may be one
    finished after ``last_checkpoint`` was last set (``last_checkpoint``, written or verified by this process,
    is not hashed again), or "" when there is none."""
    reason = f"stopped at once by a second {signal.Signals(signals.second).name}" if signals.second else None
    newest = newest_intact_checkpoint(checkpoints_dir, trusted=last_checkpoint) or ""
    return TrainingInterrupted(checkpoint=newest, reason=reason or "interrupted")
