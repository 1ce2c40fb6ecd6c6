"""Cost accounting, in one place: what a run spent beside its accuracy (DESIGN.md section 5).

Generative stages add to a run's ``CostMeter``; the trainer writes its totals into every record as
``cost_<name>`` keys. Work reused from a cache is added under ``reused_<name>`` as well as its original
cost, so a table can show both what the result needed and what this run paid.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

COST_PREFIX = "cost_"


class CostMeter:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def add(self, name: str, amount: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(amount)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """``with costs.timed("generation_seconds"): ...`` adds the block's wall time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def record_fields(self) -> dict[str, float]:
        return {COST_PREFIX + name: value for name, value in sorted(self.totals.items())}

    def state_dict(self) -> dict[str, float]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.totals = dict(state)


METRIC_PREFIX = "metric_"


class MetricMeter:
    """An algorithm's own measurements (L_LD, invalid-sample rates, density-ratio statistics), apart
    from cost: ``metrics.set(name, value)``; every later record carries ``metric_<name>`` (last value)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def set(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    def record_fields(self) -> dict[str, float]:
        return {METRIC_PREFIX + name: value for name, value in sorted(self.values.items())}

    def state_dict(self) -> dict[str, float]:
        return dict(self.values)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.values = {k: float(v) for k, v in state.items()}
