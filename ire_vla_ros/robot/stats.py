"""Small rolling statistics for diagnostics (latency mean/p95, event rates), no ROS."""
from __future__ import annotations

import threading
from collections import deque

import numpy as np

__all__ = ["RollingStats", "RateMeter"]


class RollingStats:
    """Mean / p95 / max of the last `window` samples (e.g. milliseconds). Thread-safe."""

    def __init__(self, window: int = 200):
        self._buf: deque[float] = deque(maxlen=int(window))
        self._lock = threading.Lock()
        self.total = 0

    def add(self, value: float) -> None:
        with self._lock:
            self._buf.append(float(value))
            self.total += 1

    def summary(self) -> dict:
        with self._lock:
            arr = np.fromiter(self._buf, dtype=np.float64)
        if arr.size == 0:
            return {"n": 0, "mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "max": float("nan")}
        return {"n": int(arr.size), "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
                "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}

    def values(self) -> list[float]:
        with self._lock:
            return list(self._buf)


class RateMeter:
    """Events per second over the last `window_s` seconds of caller-supplied times."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = float(window_s)
        self._t: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, t: float) -> None:
        with self._lock:
            self._t.append(float(t))
            self._trim(t)

    def _trim(self, now: float) -> None:
        while self._t and now - self._t[0] > self.window_s:
            self._t.popleft()

    def rate(self, now: float) -> float:
        with self._lock:
            self._trim(now)
            n = len(self._t)
            if n < 2:
                return 0.0
            span = self._t[-1] - self._t[0]
            return (n - 1) / span if span > 0 else 0.0
