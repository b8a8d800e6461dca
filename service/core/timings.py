"""`Timings`: the wall time one classification spends per step (the response's `timings_ms`)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

STEPS = ("decode", "encode", "match")


class Timings:
    """Seconds per step (decode, encode, match), added up over the blocks `measure` times."""

    def __init__(self) -> None:
        self.seconds = {step: 0.0 for step in STEPS}

    @contextmanager
    def measure(self, step: str) -> Iterator[None]:
        """Add the block's wall time to `step`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] += time.perf_counter() - start

    def milliseconds(self) -> dict[str, float]:
        """`{step: ms}`, rounded to microseconds."""
        return {step: round(seconds * 1000.0, 3) for step, seconds in self.seconds.items()}
