"""The wire contract: the JSON a `safety_judge` request returns, as pydantic models.

It lives in the client package so that every caller and the server share one definition; the
core library imports it, this package never imports the core.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class Outcome(str, Enum):
    """What the judge concluded about one precondition."""

    SATISFIED = "satisfied"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"  # quick tests could not decide and no reasoning was run
    NOT_EVALUATED = "not_evaluated"  # the rule was decided before this precondition mattered


class DecidedBy(str, Enum):
    """Which test of the CLUE cascade produced an outcome."""

    ALPHA1 = "alpha1"  # M(x,c) - M(None,c) < alpha1: clearly absent
    ALPHA2 = "alpha2"  # M(x,c) - M(None,c) > alpha2: clearly present
    BETA = "beta"  # M(x,c) - M(x without central object,c) > beta: present (Strategy 2)
    REASONING = "reasoning"  # chain-of-thought answer
    REASONING_UNPARSED = "reasoning_unparsed"  # garbage reasoning output, failed closed
    REASONING_BUDGET = "reasoning_budget"  # max reasoning calls reached, failed closed
    NONE = "none"


class PreconditionEvidence(BaseModel):
    """Scores and the deciding test for one alternative of one precondition item."""

    model_config = ConfigDict(extra="forbid")

    item: int = Field(description="index of the AND item in the rule's chain")
    alternative: int = Field(description="index of the OR alternative inside the item")
    text: str
    score: float | None = Field(None, description="M(x,c) = P(Yes)/(P(Yes)+P(No)) with the image")
    prior: float | None = Field(None, description="M(None,c): the same question without the image")
    score_without_center: float | None = Field(
        None, description="M(x minus central object, c) (Strategy 2), when it was computed"
    )
    outcome: Outcome
    decided_by: DecidedBy
    rationale: str | None = None
    frame: int = Field(0, description="file index of the frame this was measured on")


class Violation(BaseModel):
    """One violated rule and why."""

    model_config = ConfigDict(extra="forbid")

    rule_id: str
    title: str
    category: str
    severity: str
    reason: str
    evidence: list[PreconditionEvidence] = Field(default_factory=list)
    frames: list[int] = Field(default_factory=lambda: [0], description="file indices of the judged frames that violate it")


class Timing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    total_ms: float = 0.0
    relevance_ms: float = 0.0
    scoring_ms: float = 0.0
    strategy2_ms: float = 0.0
    reasoning_ms: float = 0.0


class Verdict(BaseModel):
    """safe/unsafe for one image under one constitution, with every violated rule."""

    model_config = ConfigDict(extra="forbid")

    safe: bool
    constitution: str
    constitution_version: str
    violations: list[Violation] = Field(default_factory=list)
    rules_considered: list[str] = Field(
        default_factory=list, description="rule ids that passed the relevance filter"
    )
    rules_skipped_by_relevance: list[str] = Field(default_factory=list)
    mllm_calls: int = Field(0, description="MLLM scoring/generation calls made for this image")
    questions_scored: int = Field(0, description="yes/no questions scored with the image")
    reasoning_calls: int = 0
    evaluator: str = ""
    model_id: str = ""
    timing: Timing = Field(default_factory=Timing)
    frame_count: int = Field(1, description="frames (pages) in the submitted file")
    frames_judged: list[int] = Field(default_factory=lambda: [0], description="file indices of the frames judged")
    request_id: str = ""

    @property
    def violated_rule_ids(self) -> list[str]:
        return [v.rule_id for v in self.violations]

    def decision(self) -> tuple[bool, tuple[str, ...]]:
        """What must agree between evaluators: safe/unsafe and the set of violated rules."""
        return self.safe, tuple(sorted(self.violated_rule_ids))
