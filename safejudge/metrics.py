"""The engine's Prometheus metrics, free of Triton: what is counted for every answered request.

The safety_judge stage's model.py registers each definition with Triton's custom-metrics API (so they appear
on Triton's metrics port beside its own `nv_*` metrics) and hands this module a sink that updates them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from safejudge_client.verdict import DecidedBy, Verdict

# Seconds; the judge stage's latency runs from milliseconds (tiny models) to minutes (reasoning on a CPU).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The label of each deciding test, as the issue and dashboards name them.
TEST_LABELS = {
    DecidedBy.ALPHA1.value: "alpha1",
    DecidedBy.ALPHA2.value: "alpha2",
    DecidedBy.BETA.value: "beta",
    DecidedBy.REASONING.value: "reasoning",
    DecidedBy.REASONING_UNPARSED.value: "unparsed",
    DecidedBy.REASONING_BUDGET.value: "budget",
    DecidedBy.NONE.value: "undecided",
}


@dataclass(frozen=True)
class MetricDefinition:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    labels: tuple[str, ...]


DEFINITIONS = (
    MetricDefinition("safejudge_verdicts_total", "counter", "verdicts returned", ("constitution", "verdict")),
    MetricDefinition("safejudge_rule_violations_total", "counter", "violated rules in returned verdicts",
                     ("constitution", "rule")),
    MetricDefinition("safejudge_preconditions_decided_total", "counter",
                     "precondition statements judged, by the CLUE test that decided them", ("constitution", "test")),
    MetricDefinition("safejudge_reasoning_calls_total", "counter", "chain-of-thought reasoning calls",
                     ("constitution",)),
    MetricDefinition("safejudge_rules_skipped_total", "counter", "rules skipped by the relevance filter",
                     ("constitution",)),
    MetricDefinition("safejudge_frames_judged_total", "counter", "image frames judged (a still image is one)",
                     ("constitution",)),
    MetricDefinition("safejudge_request_errors_total", "counter", "requests answered with an error, by kind",
                     ("kind",)),
    MetricDefinition("safejudge_judge_seconds", "histogram", "time the safety_judge stage spent on a request",
                     ("constitution",)),
    MetricDefinition("safejudge_constitution_info", "gauge",
                     "1 for each constitution file's current state (compiled, compiling, failed, not compiled, "
                     "invalid) and calibration", ("constitution", "version", "state", "calibrated")),
)
BY_NAME = {definition.name: definition for definition in DEFINITIONS}


class MetricSink(Protocol):
    def add(self, name: str, labels: dict[str, str], value: float = 1.0) -> None: ...

    def observe(self, name: str, labels: dict[str, str], value: float) -> None: ...

    def set(self, name: str, labels: dict[str, str], value: float) -> None: ...


class LabelledMetrics:
    """A MetricSink over a metrics library: make(definition, labels) returns that library's metric (with
    increment / observe / set), made once per label set."""

    def __init__(self, make: Callable[[MetricDefinition, dict[str, str]], object]):
        self.make = make
        self.metrics: dict[tuple, object] = {}

    def _metric(self, name: str, labels: dict[str, str]):
        key = (name, tuple(sorted(labels.items())))
        if key not in self.metrics:
            self.metrics[key] = self.make(BY_NAME[name], labels)
        return self.metrics[key]

    def add(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        self._metric(name, labels).increment(value)

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        self._metric(name, labels).observe(value)

    def set(self, name: str, labels: dict[str, str], value: float) -> None:
        self._metric(name, labels).set(value)


def record_verdict(sink: MetricSink, verdict: Verdict, seconds: float) -> None:
    constitution = {"constitution": verdict.constitution}
    sink.add("safejudge_verdicts_total", {**constitution, "verdict": "safe" if verdict.safe else "unsafe"})
    for violation in verdict.violations:
        sink.add("safejudge_rule_violations_total", {**constitution, "rule": violation.rule_id})
    for decided_by, count in verdict.preconditions_decided.items():
        sink.add("safejudge_preconditions_decided_total",
                 {**constitution, "test": TEST_LABELS.get(decided_by, decided_by)}, count)
    for name, value in (
        ("safejudge_reasoning_calls_total", verdict.reasoning_calls),
        ("safejudge_rules_skipped_total", len(verdict.rules_skipped_by_relevance)),
        ("safejudge_frames_judged_total", len(verdict.frames_judged)),
    ):
        sink.add(name, constitution, value)
    sink.observe("safejudge_judge_seconds", constitution, seconds)


def record_error(sink: MetricSink, kind: str, constitution: str, seconds: float) -> None:
    """kind: a fault code; constitution: a served name or the stage's one label for any other (never the
    request's own string: labels must come from a bounded set)."""
    sink.add("safejudge_request_errors_total", {"kind": kind})
    sink.observe("safejudge_judge_seconds", {"constitution": constitution}, seconds)


class ConstitutionGauge:
    """safejudge_constitution_info: the current label set of each constitution at 1, the ones it left at 0."""

    def __init__(self, sink: MetricSink):
        self.sink = sink
        self.current: dict[str, dict[str, str]] = {}

    def update(self, states: Sequence) -> None:
        seen = set()
        for state in states:
            labels = {"constitution": state.name, "version": state.version, "state": state.state,
                      "calibrated": "yes" if state.calibrated else "no"}
            seen.add(state.name)
            previous = self.current.get(state.name)
            if previous == labels:
                continue
            if previous is not None:
                self.sink.set("safejudge_constitution_info", previous, 0)
            self.sink.set("safejudge_constitution_info", labels, 1)
            self.current[state.name] = labels
        for name in set(self.current) - seen:
            self.sink.set("safejudge_constitution_info", self.current.pop(name), 0)
