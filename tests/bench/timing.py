"""Timing calls: percentiles, sequential samples, and rounds that interleave the things compared.

On a shared 2-core machine the load of the minute moves every number; figures measured in
alternating rounds (a few hundred calls of each, then again) see the same minutes, so their
ratios are fairer than those of figures measured one after the other.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

#: One round of a measured thing: makes ``n`` calls, returns each one's seconds.
Round = Callable[[int], list[float]]


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ratio_interval(
    samples: list[float], floor: list[float], q: float, coverage: float = 0.9, resamples: int = 200
) -> tuple[float, float]:
    """The middle ``coverage`` of the ``q`` quantiles' ratio over bootstrap resamples of both series.

    A p99 of 2,000 calls is the 20th slowest; on a loaded machine that call's time is luck as
    much as cost, and the interval says how far the ratio of two such figures could move with
    the same calls drawn again. Seeded: the same samples give the same interval.
    """
    draw = random.Random(0)
    ratios = sorted(
        percentile(draw.choices(samples, k=len(samples)), q) / percentile(draw.choices(floor, k=len(floor)), q)
        for _ in range(resamples)
    )
    tail = (1 - coverage) / 2
    return ratios[int(tail * resamples)], ratios[min(resamples - 1, int((1 - tail) * resamples))]


def ms(seconds: float) -> float:
    return seconds * 1000


def summary(samples: list[float]) -> str:
    pick = lambda q: ms(percentile(samples, q))  # noqa: E731
    return f"p50 {pick(0.50):6.2f} ms  p95 {pick(0.95):6.2f} ms  p99 {pick(0.99):6.2f} ms  (n={len(samples)})"


def sequential(call: Callable[[], object]) -> Round:
    """A round of back-to-back calls of ``call``."""

    def run(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return samples

    return run


def sample(call: Callable[[], object], n: int, warmup: int = 50) -> list[float]:
    """``n`` back-to-back calls after ``warmup`` unmeasured ones."""
    measure = sequential(call)
    measure(warmup)
    return measure(n)


def interleaved(rounds: Mapping[str, Round], total: int, per_round: int, warmup: int = 50) -> dict[str, list[float]]:
    """``total`` samples of each, taken ``per_round`` at a time, in turn."""
    for run in rounds.values():
        run(warmup)
    samples: dict[str, list[float]] = {name: [] for name in rounds}
    while any(len(s) < total for s in samples.values()):
        for name, run in rounds.items():
            samples[name].extend(run(min(per_round, total - len(samples[name]))))
    return samples


def for_seconds(call: Callable[[], object], seconds: float) -> tuple[list[float], dict[str, int]]:
    """Back-to-back calls for ``seconds``: each one's time, and the count of each kind of failure."""
    samples: list[float] = []
    failures: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            call()
        except Exception as error:
            kind = _kind(error)
            failures[kind] = failures.get(kind, 0) + 1
        samples.append(time.perf_counter() - start)
    return samples, failures


def _kind(error: Exception) -> str:
    code = getattr(error, "code", None)
    return str(code().name) if callable(code) else type(error).__name__
