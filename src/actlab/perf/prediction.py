"""The GPU cost model's prediction of a measured training step, and how far the measurement is from it.

A step's predicted time is its counted bytes at the card's memory bandwidth plus its counted host calls
(every dispatched operation and kernel launch) at one per-call cost, fitted once per run by least squares.
Where a measured step is more than ``DISAGREEMENT`` away from its prediction, its time goes somewhere
the counts do not see (arithmetic, kernels below the bandwidth, launches that wait on each other, work
in the framework beyond a dispatch).
"""
from __future__ import annotations

from dataclasses import dataclass

DISAGREEMENT = 0.20  # a measured step further than this from its prediction is flagged


@dataclass(frozen=True)
class CostModel:
    """Bytes at ``bandwidth`` (bytes/s) plus host calls at ``host_us`` microseconds each."""

    bandwidth: float
    host_us: float

    def predict_ms(self, counts: dict) -> float:
        """Milliseconds of a step whose counts hold its ``bytes`` and ``host_calls``."""
        return self.device_ms(counts) + counts["host_calls"] * self.host_us / 1e3

    def device_ms(self, counts: dict) -> float:
        """Milliseconds the step's bytes take at the bandwidth alone."""
        return counts["bytes"] / self.bandwidth * 1e3


def fit(points: list[tuple[dict, float]], bandwidth: float) -> CostModel:
    """The per-call cost that best explains ``points`` ((counts, measured ms) pairs: steps, or what steps
    add to others) beside their bytes at ``bandwidth``: least squares through the origin on what the bytes
    leave unexplained, never below zero.

    Raises:
        ValueError: without a point to fit on, or with a bandwidth that is not positive.
    """
    if not points:
        raise ValueError("fitting the per-call cost needs at least one counted step")
    if not bandwidth > 0:
        raise ValueError(f"the bandwidth must be positive bytes/s, got {bandwidth}")
    device = CostModel(bandwidth, 0.0)
    num = sum(c["host_calls"] * (ms - device.device_ms(c)) for c, ms in points)
    den = sum(c["host_calls"] ** 2 for c, _ in points)
    return CostModel(bandwidth, max(num / den, 0.0) * 1e3 if den else 0.0)


def disagrees(measured_ms: float, predicted_ms: float) -> bool:
    """Whether a measurement is more than ``DISAGREEMENT`` away from its prediction (in either direction)."""
    return abs(measured_ms / predicted_ms - 1.0) > DISAGREEMENT
