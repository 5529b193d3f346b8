"""Model choice on the validation split: keep the best epoch, stop when val stops improving.

A stage's exported model is the epoch with the highest val mR (ties keep the earlier one),
not the last. With `patience` > 0 a stage also stops once `patience` counted epochs in a row
have not improved on the best; epochs still inside the curriculum's pacing ramp are not
counted (they train on a growing share of the data, so a dip there is expected), though
they can still be the best. The state travels in the checkpoint, so a resumed run keeps it.
Test data is never seen here: the loops feed it the val split only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Selection:
    """Best-epoch tracking and early stopping on one validation metric (higher is better)."""

    patience: int = 0  # 0 = never stop early
    best: float = -math.inf
    best_epoch: int = 0  # 1-based; 0 = none yet
    waited: int = 0  # counted epochs since the best
    stopped: bool = False

    def update(self, epoch: int, value: float, counts: bool = True) -> bool:
        """Record `value` for 1-based `epoch`; True when it is the new best (export it then)."""
        if value > self.best:
            self.best, self.best_epoch, self.waited = float(value), int(epoch), 0
            return True
        if counts:
            self.waited += 1
            self.stopped = self.patience > 0 and self.waited >= self.patience
        return False

    def metrics(self) -> dict[str, float]:
        return {"val_best_mR": self.best, "best_epoch": self.best_epoch}

    def state(self) -> dict:
        return {"selection": asdict(self)}

    @classmethod
    def from_state(cls, client: dict, patience: int) -> Selection:
        """The checkpoint's selection state (patience from the current config), else a fresh one."""
        saved = dict(client.get("selection") or {})
        saved["patience"] = patience
        return cls(**saved)
