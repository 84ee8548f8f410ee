"""Early stopping on a validation score: keep a copy of the weights at the best score, say when the score has
not improved for ``patience`` measurements, and put the best weights back at the end (so final/ is the best
model measured, not the last one). One process only: a sharded model's state dict is not a whole copy.
"""

from __future__ import annotations

import math

import torch


class BestWeights:
    """The best validation score so far, the weights that gave it (on the CPU) and the patience count."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.best_score = -math.inf
        self.best_index = -1  # which measurement (0-based) gave the best score
        self.scores: list[float] = []
        self.since_best = 0
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, model: torch.nn.Module, score: float) -> bool:
        """Record a measurement of ``model``; a strictly better score copies its weights. Returns whether
        it improved (a tie keeps the earlier, shorter-trained weights)."""
        self.scores.append(score)
        if score > self.best_score:
            self.best_score, self.best_index, self.since_best = score, len(self.scores) - 1, 0
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.since_best >= self.patience

    def restore(self, model: torch.nn.Module) -> bool:
        """Load the best weights into ``model``; False (and nothing loaded) when nothing was measured."""
        if self._state is None:
            return False
        model.load_state_dict(self._state)
        return True
