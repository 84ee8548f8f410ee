"""A stand-in failure monitor for resume tests: it presses Ctrl-C at a chosen step."""

from __future__ import annotations

import os
import signal


class SignalAt:
    """A 'monitor' that sends this process SIGINT when it sees ``step``, as a user's Ctrl-C would."""

    name, action = "signal", "warn"
    keys = ()  # reads no logged key

    def __init__(self, step: int):
        self.step = step

    def update(self, step: int, row: dict):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return None
