"""Budget that follows the link (`disco serve --latency-target-ms MS`, a deployment carrying several budgets).

Requests that name no budget run at the adapter's current level. Every batch's time at the ranks (send, compute,
receive: what the network slows) updates a moving average of that level; after `patience` batches at a level
the adapter steps to the next smaller budget when the average is above the target (the link slowed), and to the
next larger one when it is below `headroom` times the target (the link recovered). A step restarts the average,
so each level is judged on its own batches. When the larger budget is over the target too, the adapter comes
back down after `patience` batches: it probes upwards at most once every 2 * patience batches.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from disco.errors import DiscoError


@dataclass
class BudgetAdapter:
    levels: int  # budgets the deployment carries (level 0: the largest)
    level: int  # where it starts (the service's default budget)
    target_s: float  # batch time to stay under
    patience: int = 8  # batches at a level before it may step
    smoothing: float = 0.3  # weight of the newest batch in the moving average
    headroom: float = 0.5  # step up only when a level's average is under this fraction of the target
    _average: float | None = field(default=None, init=False)
    _seen: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise DiscoError("--latency-target-ms needs a deployment carrying several budgets (`disco export RUN "
                             "--budgets all`): with one budget there is nothing to switch to")
        if self.target_s <= 0 or self.patience < 1 or not 0 < self.smoothing <= 1 or not 0 < self.headroom < 1:
            raise DiscoError("--latency-target-ms must be positive")
        if not 0 <= self.level < self.levels:
            raise DiscoError(f"no budget level {self.level}: the deployment carries {self.levels}")

    def current(self) -> int:
        """The level of a request that names no budget."""
        return self.level

    def observe(self, level: int, seconds: float) -> int:
        """One batch's time at the ranks at `level` (batches at other levels, asked for by name, are ignored);
        returns the level requests run at from now on."""
        with self._lock:
            if level != self.level:
                return self.level
            self._average = seconds if self._average is None else (
                self.smoothing * seconds + (1 - self.smoothing) * self._average)
            self._seen += 1
            if self._seen >= self.patience:
                if self._average > self.target_s and self.level < self.levels - 1:
                    self._step(+1)
                elif self._average < self.headroom * self.target_s and self.level > 0:
                    self._step(-1)
            return self.level

    def _step(self, direction: int) -> None:
        self.level += direction
        self._average, self._seen = None, 0
