"""Exceptions the command line turns into a short message and an exit code instead of a traceback.

Library code raises these; ``alignkit.cli`` decides how each one is reported.
"""

from __future__ import annotations


class AlignkitError(Exception):
    """Base class for the errors alignkit raises on purpose (bad input, interrupted runs)."""


class TrainingInterrupted(AlignkitError):
    """Training stopped early (SIGINT/SIGTERM, or the loop gave up) after writing a checkpoint.

    ``checkpoint`` is its directory, or "" when none was written. The CLI prints where the checkpoint is and the ``resume_from=<checkpoint>`` override that continues
    the run, then exits 130 (the shell convention for a run stopped by Ctrl-C).
    """

    def __init__(self, checkpoint: str, reason: str = "interrupted") -> None:
        # An empty checkpoint means the run stopped before it could write one (nothing to resume from).
        where = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"training {reason}; {where}")
        self.checkpoint = str(checkpoint)
        self.reason = reason

    def __reduce__(self):
        # Exception pickles as cls(*self.args), and args holds the message, not the checkpoint;
        # spell the constructor arguments out so the error survives a trip through multiprocessing.
        return (type(self), (self.checkpoint, self.reason))


class AlignkitDeprecationWarning(FutureWarning):
    """A config key, value or import path that still works for one release; the message names its new spelling.

    A FutureWarning, so people running the CLI see it (Python hides DeprecationWarning outside ``__main__``).
    """
