"""The result line every benchmark ends with, and small statistics helpers."""

from __future__ import annotations

import json
import statistics
import sys

import attrs


@attrs.frozen
class Result:
    """One metric against the baseline measured in the same run.

    ``lower_is_better`` metrics (latencies) meet their goal when
    ``ratio <= goal``; throughputs when ``ratio >= goal``. A metric reported
    for information has no goal (``goal`` and ``met`` are null)."""

    bench: str
    metric: str
    value: float
    baseline: float
    goal: float | None
    lower_is_better: bool
    unit: str = ""
    baseline_name: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.ratio <= self.goal if self.lower_is_better else self.ratio >= self.goal

    def line(self) -> str:
        return json.dumps(
            {
                "bench": self.bench,
                "metric": self.metric,
                "value": round(self.value, 3),
                "baseline": round(self.baseline, 3),
                "ratio": round(self.ratio, 3),
                "goal": None
                if self.goal is None
                else ("<= " if self.lower_is_better else ">= ") + str(self.goal),
                "met": self.met,
                "unit": self.unit,
                "baseline_name": self.baseline_name,
            }
        )


def emit(results: list[Result]) -> list[Result]:
    sys.stdout.flush()
    for r in results:
        print(r.line(), flush=True)
    return results


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def note(text: str) -> None:
    """Progress for a human, on stderr so stdout stays machine-readable."""
    print(text, file=sys.stderr, flush=True)
