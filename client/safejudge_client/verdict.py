"""The wire contract: the JSON a `safety_judge` request returns, as pydantic models.

It lives in the client package so that every caller and the server share one definition; the
core library imports it, this package never imports the core.

The contract can grow: every model ignores fields it does not know and an enum field keeps a value it
does not know as a plain string, so a client parses the verdicts of newer servers.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2  # 2: frames, request_id, schema_version

E = TypeVar("E", bound=Enum)
# A known value parses to its enum member (tried first), one a newer server added stays a plain string.
OpenEnum = Annotated[Union[E, str], Field(union_mode="left_to_right")]


class WireModel(BaseModel):
    """Fields a newer server adds are ignored, not rejected."""

    model_config = ConfigDict(extra="ignore")


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


class ViewKind(str, Enum):
    """How Strategy 2 made its view of the image from the central object's box."""

    REMOVED = "removed"  # the box filled with the image's mean colour: M(x minus i, c) for the beta test
    CROP = "crop"  # a box under crop_area_fraction of the image: the crop replaces the image


class PreconditionEvidence(WireModel):
    """Scores and the deciding test for one alternative of one precondition item."""

    item: int = Field(description="index of the AND item in the rule's chain")
    alternative: int = Field(description="index of the OR alternative inside the item")
    text: str
    score: float | None = Field(None, description="M(x,c) = P(Yes)/(P(Yes)+P(No)) with the image")
    prior: float | None = Field(None, description="M(None,c): the same question without the image")
    score_without_center: float | None = Field(
        None, description="M(x minus central object, c) (Strategy 2), when it was computed"
    )
    outcome: OpenEnum[Outcome]
    decided_by: OpenEnum[DecidedBy]
    rationale: str | None = None
    frame: int = Field(0, description="file index of the frame (page) this evidence was measured on")
    central_object: str | None = Field(None, description="the precondition's central object word (Strategy 2)")
    view: OpenEnum[ViewKind] | None = Field(
        None, description="the Strategy 2 view this precondition was scored on: removed (score_without_center) "
        "or crop (score is the crop's); None: the image only"
    )


class Violation(WireModel):
    """One violated rule and why."""

    rule_id: str
    title: str
    category: str
    severity: str
    reason: str
    evidence: list[PreconditionEvidence] = Field(default_factory=list)
    frames: list[int] = Field([0], description="file indices of the judged frames in which the rule is violated")


class RuleExplanation(WireModel):
    """One rule of the constitution on one frame: relevance, outcome and every precondition."""

    rule_id: str
    title: str
    text: str
    severity: str
    relevance: float | None = Field(
        None, description="cos(CLIP(image), CLIP(rule text)); None when the relevance filter did not run"
    )
    considered: bool = Field(description="kept by the relevance filter (False: skipped, nothing else evaluated)")
    outcome: OpenEnum[Outcome] = Field(
        description="satisfied: violated; failed: a precondition item fails; not_evaluated: skipped"
    )
    preconditions: list[PreconditionEvidence] = Field(
        default_factory=list, description="every alternative of every item, not_evaluated where nothing was asked"
    )


class Strategy2View(WireModel):
    """A view Strategy 2 scored: the central object's box, found by the detector. No pixels: a caller
    recomputes the view from the image and the box (safejudge.evaluators.strategy2_view)."""

    central_object: str
    box: tuple[int, int, int, int] = Field(description="left, top, right, bottom in pixels of the frame")
    confidence: float = Field(description="the detector's confidence in the box")
    kind: OpenEnum[ViewKind]


class FrameExplanation(WireModel):
    frame: int = Field(description="file index of the judged frame")
    rules: list[RuleExplanation] = Field(default_factory=list, description="every enabled rule, in constitution order")
    views: list[Strategy2View] = Field(default_factory=list)


class Explanation(WireModel):
    """Everything behind a verdict (OPTIONS `{"explain": true}`): per judged frame, every rule's relevance and
    outcome, every precondition's scores and deciding test, and the Strategy 2 views."""

    thresholds: dict[str, float] = Field(default_factory=dict, description="the thresholds the verdict used")
    frames: list[FrameExplanation] = Field(default_factory=list)


class Timing(WireModel):
    total_ms: float = 0.0
    relevance_ms: float = 0.0
    scoring_ms: float = 0.0
    strategy2_ms: float = 0.0
    reasoning_ms: float = 0.0


class Verdict(WireModel):
    """safe/unsafe for one image under one constitution, with every violated rule."""

    schema_version: int = Field(SCHEMA_VERSION, description="the version of this contract the server wrote")
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
    frames_judged: list[int] = Field([0], description="file indices of the frames that were judged")
    request_id: str = Field("", description="the server's id of this request, for its logs")
    preconditions_decided: dict[str, int] = Field(
        default_factory=dict, description="precondition statements judged, by the test that decided them (DecidedBy values)"
    )
    explanation: Explanation | None = Field(None, description="only when the request asked for it (explain)")

    @property
    def violated_rule_ids(self) -> list[str]:
        return [v.rule_id for v in self.violations]

    def decision(self) -> tuple[bool, tuple[str, ...]]:
        """What must agree between evaluators: safe/unsafe and the set of violated rules."""
        return self.safe, tuple(sorted(self.violated_rule_ids))
