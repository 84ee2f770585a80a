"""Two evaluators over one model interface: the paper's sequential loop and the batched engine.

`sequential` runs Algorithm 1 as published: rule by rule, precondition by precondition, one MLLM call
for M(x,c) and one for the prior M(None,c) every time, stopping a rule at its first failed item. It is
the reference and the performance baseline. `batched` looks priors up in the compiled constitution,
scores the questions in batched calls (a schedule, below), and runs Strategy 2 and reasoning only for
what is still undecided, each as one batched call. Both give the same verdict (tests/test_evaluators).

Schedules of the engine's scoring (JudgeOptions.schedule):
- "all": every question of every relevant rule in ONE scoring call.
- "waves": wave 1 asks the first item's alternatives of every relevant rule; each later wave asks, of
  every rule not yet cleared by a failed item, the alternatives of its next item not yet held. Items
  left inconclusive by the quick tests do NOT stop their rule: its next item is asked speculatively in
  the next wave, and Strategy 2 and reasoning run once, after the last wave, exactly as with "all".
  So a judgement takes at most (longest chain) scoring calls, and only questions of rules whose earlier
  items all hold or are inconclusive are scored. The trade-off: a question is sometimes scored for a rule
  that reasoning about an earlier inconclusive item would have cleared (a wasted suffix of a few tokens),
  in exchange for never waiting on reasoning between waves (no extra waves) and never reasoning about an
  item whose rule a cheap later question clears. The verdict equals "all"'s (and the paper's loop's):
  a rule cleared by either is cleared by the same failed item, and a rule not cleared has every item
  held or fully scored under both, so Strategy 2 and reasoning see the same pending statements.
- None: the MLLM backend's `preferred_schedule` attribute ("all" when it has none), set by measurement
  (benchmarks/RESULTS.md, "Schedules").
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from safejudge.backends.base import Detection, Models
from safejudge.compiled import CompiledConstitution
from safejudge.constitution import Rule, Thresholds
from safejudge.decision import (
    chain_outcome,
    item_outcome,
    parse_reasoning,
    quick_decision,
    strategy2_decision,
)
from safejudge.images import box_area_fraction, crop_region, pixel_digest, remove_region
from safejudge_client.verdict import (
    DecidedBy,
    Explanation,
    FrameExplanation,
    Outcome,
    PreconditionEvidence,
    RuleExplanation,
    Strategy2View,
    Timing,
    Verdict,
    ViewKind,
    Violation,
)


Schedule = Literal["all", "waves"]
SCHEDULES: tuple[str, ...] = ("all", "waves")


class JudgeOptions(BaseModel):
    """Per-request settings (the `OPTIONS` JSON of a request)."""

    model_config = ConfigDict(extra="forbid")

    thresholds: dict[str, float] = Field(
        default_factory=dict, description="overrides of the constitution's Thresholds fields"
    )
    max_reasoning_calls: int | None = Field(
        None, ge=0, description="reasoning calls per image; None: no limit in process, the server's default when served"
    )
    frames: int | None = Field(
        None, ge=1, description="frames of an animated image to judge; None: the default (8) or the server's"
    )
    evidence: Literal["full", "none"] = "full"
    schedule: Schedule | None = Field(
        None,
        description='scoring schedule: "all" questions in one call, or "waves" item by item, asking only what '
        "can still change the verdict; None: the MLLM backend's preference",
    )
    relevance_filter: bool = True
    strategy2: bool = True
    fail_closed: bool = Field(
        True, description="garbage reasoning output or an exhausted budget counts as the content being visible"
    )
    explain: bool = Field(
        False,
        description="add Verdict.explanation: every rule's relevance and outcome, every precondition's evidence, "
        "the Strategy 2 boxes",
    )

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, overrides: dict[str, float]) -> dict[str, float]:
        """Unknown names and out-of-range values are the request's error, found when it is parsed."""
        try:
            Thresholds().merged(overrides)
        except ValidationError as exc:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        return overrides

    def thresholds_for(self, base: Thresholds) -> Thresholds:
        return base.merged(self.thresholds)

    def schedule_for(self, mllm: object) -> Schedule:
        """The schedule asked for, else the backend's `preferred_schedule`, else "all"."""
        schedule = self.schedule or getattr(mllm, "preferred_schedule", None) or "all"
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r} (backend preference?); one of {', '.join(SCHEDULES)}")
        return schedule


@dataclass
class Assessment:
    """Everything learned about one precondition statement for one image."""

    text: str
    central_object: str | None
    score: float | None = None
    prior: float | None = None
    score_without_center: float | None = None
    outcome: Outcome = Outcome.NOT_EVALUATED
    decided_by: DecidedBy = DecidedBy.NONE
    rationale: str | None = None
    view: ViewKind | None = None  # the Strategy 2 view it was scored on
    reasoning_image: Image.Image | None = field(default=None, repr=False)


class _CallCounter:
    """Wraps the MLLM to count calls and image-conditioned questions for the verdict."""

    def __init__(self, models: Models):
        self.models = models
        self.calls = 0
        self.questions_scored = 0
        self.reasoning_calls = 0

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if image is not None:
            self.questions_scored += len(questions)
        return np.asarray(self.models.mllm.score(image, list(questions)), dtype=np.float64)

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        self.calls += 1
        self.reasoning_calls += len(questions)
        answers = self.models.mllm.reason(image, list(questions))
        if len(answers) != len(questions):
            raise RuntimeError(f"MLLM returned {len(answers)} reasoning answers for {len(questions)} questions")
        return answers


@dataclass
class _Clock:
    timing: Timing = field(default_factory=Timing)

    def add(self, name: str, start: float) -> None:
        setattr(self.timing, name, getattr(self.timing, name) + (time.perf_counter() - start) * 1000.0)


def _relevant_rules(
    image: Image.Image,
    rules: list[Rule],
    rule_embeddings: Callable[[], np.ndarray | None],
    models: Models,
    thresholds: Thresholds,
    options: JudgeOptions,
    image_embedding: np.ndarray | None = None,
) -> tuple[list[Rule], list[Rule], dict[str, float]]:
    """The paper's relevance scan: keep a rule iff cos(CLIP(image), CLIP(rule text)) > t.

    Returns the kept rules, the skipped ones and every rule's cosine by id (empty when the scan did not run).
    image_embedding, when given, was computed upstream (the server's relevance stage)."""
    if not options.relevance_filter or (models.relevance is None and image_embedding is None):
        return rules, [], {}
    text_embeddings = rule_embeddings()
    if image_embedding is None:
        image_embedding = np.asarray(models.relevance.embed_images([image]), dtype=np.float32)[0]
    cosines = np.asarray(text_embeddings, dtype=np.float32) @ image_embedding
    similarity = dict(zip((rule.id for rule in rules), cosines.tolist(), strict=True))
    kept = [rule for rule in rules if similarity[rule.id] > thresholds.relevance]
    skipped = [rule for rule in rules if similarity[rule.id] <= thresholds.relevance]
    return kept, skipped, similarity


def _apply_quick(assessment: Assessment, thresholds: Thresholds) -> None:
    decision = quick_decision(assessment.score, assessment.prior, thresholds)
    assessment.outcome, assessment.decided_by = decision.outcome, decision.decided_by


def strategy2_view(image: Image.Image, box: tuple[int, int, int, int], kind: ViewKind) -> Image.Image:
    """The view Strategy 2 scores: the image with the box removed, or the box's crop."""
    return crop_region(image, box) if kind == ViewKind.CROP else remove_region(image, box)


def _strategy2(
    image: Image.Image, pending: list[Assessment], counter: _CallCounter, thresholds: Thresholds
) -> list[Strategy2View]:
    """Non-central bias: compare with the central object removed (or zoom in on a tiny one).

    One detector call for every distinct central-object word, then one scoring call per view. Returns the
    views it scored (their boxes; the verdict's explanation).
    """
    detector = counter.models.detector
    candidates = [a for a in pending if a.central_object]
    if detector is None or not candidates:
        return []
    words = list(dict.fromkeys(a.central_object for a in candidates))
    detections: dict[str, Detection | None] = dict(zip(words, detector.detect(image, words), strict=True))
    by_view: dict[str, list[Assessment]] = {}
    views: dict[str, tuple[Strategy2View, Image.Image]] = {}
    for word, detection in detections.items():
        if detection is None or detection.confidence <= thresholds.detector_confidence:
            continue
        tiny = box_area_fraction(image, detection) < thresholds.crop_area_fraction
        kind = ViewKind.CROP if tiny else ViewKind.REMOVED
        described = Strategy2View(central_object=word, box=detection.box, confidence=detection.confidence, kind=kind)
        views[word] = (described, strategy2_view(image, detection.box, kind))
    for assessment in candidates:
        if assessment.central_object in views:
            by_view.setdefault(assessment.central_object, []).append(assessment)
    for word, group in by_view.items():
        described, view = views[word]
        kind = described.kind
        view_scores = counter.score(view, [a.text for a in group])
        for assessment, view_score in zip(group, view_scores, strict=True):
            assessment.view = kind
            if kind == ViewKind.REMOVED:
                assessment.score_without_center = float(view_score)
                decision = strategy2_decision(assessment.score, assessment.score_without_center, thresholds)
            else:
                # A tiny object: the crop replaces the image for the remaining checks.
                assessment.score = float(view_score)
                assessment.reasoning_image = view
                decision = quick_decision(assessment.score, assessment.prior, thresholds)
            assessment.outcome, assessment.decided_by = decision.outcome, decision.decided_by
    return [described for described, _ in views.values()]


def _reason(
    image: Image.Image,
    pending: list[Assessment],
    counter: _CallCounter,
    options: JudgeOptions,
) -> None:
    """Cascaded reasoning for the still-inconclusive statements, one batched call per image view."""
    budget = None if options.max_reasoning_calls is None else options.max_reasoning_calls - counter.reasoning_calls
    allowed = pending if budget is None else pending[: max(budget, 0)]
    for assessment in pending[len(allowed):]:
        assessment.outcome = Outcome.SATISFIED if options.fail_closed else Outcome.FAILED
        assessment.decided_by = DecidedBy.REASONING_BUDGET
        assessment.rationale = "reasoning budget exhausted"
    groups: dict[int, list[Assessment]] = {}
    for assessment in allowed:
        groups.setdefault(id(assessment.reasoning_image), []).append(assessment)
    for group in groups.values():
        view = group[0].reasoning_image or image
        for assessment, raw in zip(group, counter.reason(view, [a.text for a in group]), strict=True):
            answer = parse_reasoning(raw, fail_closed=options.fail_closed)
            assessment.outcome = Outcome.SATISFIED if answer.holds else Outcome.FAILED
            assessment.decided_by = DecidedBy.REASONING if answer.parsed else DecidedBy.REASONING_UNPARSED
            assessment.rationale = answer.rationale


def _describe(a: Assessment) -> str:
    if a.decided_by in (DecidedBy.REASONING, DecidedBy.REASONING_UNPARSED, DecidedBy.REASONING_BUDGET):
        return f"'{a.text}' ({a.decided_by.value}: {a.rationale})"
    if a.decided_by == DecidedBy.BETA:
        return f"'{a.text}' (beta: M={a.score:.2f}, {a.score_without_center:.2f} without the {a.central_object})"
    return f"'{a.text}' ({a.decided_by.value}: M={a.score:.2f}, prior {a.prior:.2f})"


def _evidence(
    rule: Rule, assessments: dict[tuple, Assessment], frame: int, unevaluated: bool = False
) -> list[PreconditionEvidence]:
    """The evidence of each alternative of the rule's chain that was evaluated; with unevaluated, of every
    alternative (not_evaluated, without scores, where nothing was learned)."""
    evidence = []
    for item_index, item in enumerate(rule.preconditions):
        for alt_index, alt in enumerate(item):
            a = assessments.get((alt.text, alt.central_object)) or Assessment(alt.text, alt.central_object)
            if a.outcome == Outcome.NOT_EVALUATED and not unevaluated:
                continue
            evidence.append(
                PreconditionEvidence(
                    item=item_index,
                    alternative=alt_index,
                    text=a.text,
                    score=a.score,
                    prior=a.prior,
                    score_without_center=a.score_without_center,
                    outcome=a.outcome,
                    decided_by=a.decided_by,
                    rationale=a.rationale,
                    frame=frame,
                    central_object=a.central_object,
                    view=a.view,
                )
            )
    return evidence


def _violation(
    rule: Rule, assessments: dict[tuple, Assessment], options: JudgeOptions, frame: int, frames: Sequence[int]
) -> Violation:
    def first_holding(item) -> Assessment:  # in a violated rule, every item has one
        return next(
            a for alt in item
            if (a := assessments.get((alt.text, alt.central_object))) is not None and a.outcome == Outcome.SATISFIED
        )

    reasons = [_describe(first_holding(item)) for item in rule.preconditions]
    return Violation(
        rule_id=rule.id,
        title=rule.title,
        category=rule.category,
        severity=rule.severity.value,
        reason="all preconditions hold: " + "; ".join(reasons),
        evidence=_evidence(rule, assessments, frame) if options.evidence == "full" else [],
        frames=list(frames),
    )


def _rule_outcome(rule: Rule, assessments: dict[tuple, Assessment]) -> Outcome:
    def alt_outcome(alt) -> Outcome:
        a = assessments.get((alt.text, alt.central_object))
        return a.outcome if a is not None else Outcome.NOT_EVALUATED

    return chain_outcome(item_outcome(alt_outcome(alt) for alt in item) for item in rule.preconditions)


def judge_sequential(
    image: Image.Image, compiled: CompiledConstitution, models: Models, options: JudgeOptions | None = None
) -> Verdict:
    """Algorithm 1 as the paper runs it. Uses nothing precomputed: priors and rule embeddings are
    recomputed for every image, one MLLM call per question."""
    options = options or JudgeOptions()
    thresholds = options.thresholds_for(compiled.constitution.thresholds)
    started, clock, counter = time.perf_counter(), _Clock(), _CallCounter(models)
    rules = compiled.rules

    t = time.perf_counter()
    relevant, skipped, relevance = _relevant_rules(
        image, rules, lambda: models.relevance.embed_texts([r.text for r in rules]), models, thresholds, options
    )
    clock.add("relevance_ms", t)

    assessments: dict[tuple, Assessment] = {}
    views: dict[str, Strategy2View] = {}
    for rule in relevant:
        for item in rule.preconditions:
            item_holds = False
            for alt in item:
                a = Assessment(alt.text, alt.central_object)
                assessments[(alt.text, alt.central_object)] = a
                t = time.perf_counter()
                a.score = float(counter.score(image, [alt.text])[0])
                a.prior = float(counter.score(None, [alt.text])[0])
                _apply_quick(a, thresholds)
                clock.add("scoring_ms", t)
                if a.outcome == Outcome.INCONCLUSIVE and options.strategy2:
                    t = time.perf_counter()
                    views.update((view.central_object, view) for view in _strategy2(image, [a], counter, thresholds))
                    clock.add("strategy2_ms", t)
                if a.outcome == Outcome.INCONCLUSIVE:
                    t = time.perf_counter()
                    _reason(image, [a], counter, options)
                    clock.add("reasoning_ms", t)
                if a.outcome == Outcome.SATISFIED:
                    item_holds = True
                    break
            if not item_holds:
                break  # one failed item clears the rule: the paper stops checking it
    result = _FrameResult(relevant, skipped, assessments, relevance, list(views.values()))
    return _verdict_of_frames(compiled, [result], [0], 1, counter, clock, options, thresholds, started, "sequential")


def _pending(relevant: list[Rule], assessments: dict[tuple, Assessment]) -> list[Assessment]:
    """Inconclusive statements that can still change a verdict: in an item not yet held, of a rule
    not yet cleared by a failed item. In rule and chain order (the order reasoning budgets follow)."""
    pending: dict[int, Assessment] = {}
    for rule in relevant:
        if _rule_outcome(rule, assessments) != Outcome.INCONCLUSIVE:
            continue
        for item in rule.preconditions:
            # An alternative never scored ("waves": its item already held) counts as not evaluated.
            alts = [assessments.get((alt.text, alt.central_object)) for alt in item]
            outcomes = (Outcome.NOT_EVALUATED if a is None else a.outcome for a in alts)
            if item_outcome(outcomes) == Outcome.INCONCLUSIVE:
                for a in alts:
                    if a is not None and a.outcome == Outcome.INCONCLUSIVE:
                        pending.setdefault(id(a), a)
    return list(pending.values())


@dataclass
class _FrameResult:
    """What one frame's judgement found: the relevance split and cosines, every precondition's assessment
    and the Strategy 2 views scored."""

    relevant: list[Rule]
    skipped: list[Rule]
    assessments: dict[tuple, Assessment]
    relevance: dict[str, float]
    views: list[Strategy2View]

    @property
    def violated(self) -> list[Rule]:
        return [rule for rule in self.relevant if _rule_outcome(rule, self.assessments) == Outcome.SATISFIED]


def _every_alternative(relevant: list[Rule]) -> list[tuple]:
    return list(
        dict.fromkeys((alt.text, alt.central_object) for rule in relevant for item in rule.preconditions for alt in item)
    )


def _next_wave(relevant: list[Rule], assessments: dict[tuple, Assessment]) -> list[tuple]:
    """The "waves" schedule: of every rule not cleared by a failed item, the unscored alternatives of its
    first item that does not already hold. An item that is scored but inconclusive does not stop its
    rule (the next item is asked speculatively; see the module docstring). Empty when nothing is left."""
    wave: dict[tuple, None] = {}
    for rule in relevant:
        if _rule_outcome(rule, assessments) == Outcome.FAILED:
            continue
        for item in rule.preconditions:
            keys = [(alt.text, alt.central_object) for alt in item]
            if any((a := assessments.get(key)) is not None and a.outcome == Outcome.SATISFIED for key in keys):
                continue
            unscored = [key for key in keys if key not in assessments]
            if unscored:
                wave.update(dict.fromkeys(unscored))
                break
    return list(wave)


def _score_wave(
    image: Image.Image,
    keys: list[tuple],
    assessments: dict[tuple, Assessment],
    scores: dict[str, float],
    compiled: CompiledConstitution,
    counter: _CallCounter,
    thresholds: Thresholds,
) -> None:
    """One scoring call for the statements of keys not scored yet, then the quick tests on each key."""
    statements = [text for text in dict.fromkeys(text for text, _ in keys) if text not in scores]
    if statements:
        scores.update(zip(statements, map(float, counter.score(image, statements)), strict=True))
    for key in keys:
        a = assessments[key] = Assessment(*key)
        a.score, a.prior = scores[a.text], compiled.priors[a.text]
        _apply_quick(a, thresholds)


def _judge_frame(
    image: Image.Image,
    compiled: CompiledConstitution,
    models: Models,
    options: JudgeOptions,
    thresholds: Thresholds,
    counter: _CallCounter,
    clock: _Clock,
    image_embedding: np.ndarray | None,
) -> _FrameResult:
    """The engine on one image: the questions of the relevant rules in one scoring call ("all") or in waves
    ("waves"), priors from the compiled constitution, then Strategy 2 and reasoning, each batched, only
    where a verdict depends on it."""
    t = time.perf_counter()
    relevant, skipped, relevance = _relevant_rules(
        image, compiled.rules, lambda: compiled.rule_embeddings, models, thresholds, options, image_embedding
    )
    clock.add("relevance_ms", t)

    t = time.perf_counter()
    assessments: dict[tuple, Assessment] = {}
    scores: dict[str, float] = {}
    if options.schedule_for(models.mllm) == "all":
        _score_wave(image, _every_alternative(relevant), assessments, scores, compiled, counter, thresholds)
    else:
        while wave := _next_wave(relevant, assessments):
            _score_wave(image, wave, assessments, scores, compiled, counter, thresholds)
    clock.add("scoring_ms", t)

    views = []
    if options.strategy2:
        t = time.perf_counter()
        views = _strategy2(image, _pending(relevant, assessments), counter, thresholds)
        clock.add("strategy2_ms", t)

    pending = _pending(relevant, assessments)
    if pending:
        t = time.perf_counter()
        _reason(image, pending, counter, options)
        clock.add("reasoning_ms", t)
    return _FrameResult(relevant, skipped, assessments, relevance, views)


def judge_batched(
    image: Image.Image,
    compiled: CompiledConstitution,
    models: Models,
    options: JudgeOptions | None = None,
    image_embedding: np.ndarray | None = None,
) -> Verdict:
    """The engine on one still image. image_embedding: its relevance embedding, when an earlier stage computed it."""
    return judge_frames([image], compiled, models, options, None if image_embedding is None else [image_embedding])


def judge_frames(
    frames: Sequence[Image.Image],
    compiled: CompiledConstitution,
    models: Models,
    options: JudgeOptions | None = None,
    image_embeddings: Sequence[np.ndarray] | None = None,
    frame_indices: Sequence[int] | None = None,
    frame_count: int | None = None,
) -> Verdict:
    """The engine on the sampled frames of one image (a still image is one frame).

    Each frame is judged as an image of its own, sharing the compiled constitution (priors, rule embeddings)
    and one reasoning budget; a frame identical to an earlier one reuses its result. A rule is violated if it
    is violated in any frame; its violation names those frames and carries the evidence of the first.
    frame_indices are the frames' indices in the file (default 0, 1, ...), frame_count the file's frames.
    """
    if not frames:
        raise ValueError("judge_frames needs at least one frame")
    options = options or JudgeOptions()
    indices = list(frame_indices) if frame_indices is not None else list(range(len(frames)))
    if len(indices) != len(frames) or (image_embeddings is not None and len(image_embeddings) != len(frames)):
        raise ValueError("frames, frame_indices and image_embeddings must have one entry per frame")
    thresholds = options.thresholds_for(compiled.constitution.thresholds)
    started, clock, counter = time.perf_counter(), _Clock(), _CallCounter(models)
    results: list[_FrameResult] = []
    seen: dict[bytes, _FrameResult] = {}
    for position, frame in enumerate(frames):
        # Animations often repeat a frame (a still GIF, a loop's end): judge its pixels once.
        key = pixel_digest(frame) if len(frames) > 1 else b""
        if key not in seen:
            embedding = None if image_embeddings is None else image_embeddings[position]
            seen[key] = _judge_frame(frame, compiled, models, options, thresholds, counter, clock, embedding)
        results.append(seen[key])
    return _verdict_of_frames(
        compiled, results, indices, frame_count or len(frames), counter, clock, options, thresholds, started, "batched"
    )


def _verdict_of_frames(
    compiled: CompiledConstitution,
    results: list[_FrameResult],
    indices: list[int],
    frame_count: int,
    counter: _CallCounter,
    clock: _Clock,
    options: JudgeOptions,
    thresholds: Thresholds,
    started: float,
    evaluator: str,
) -> Verdict:
    violated_in: dict[str, list[int]] = {}
    for result, index in zip(results, indices, strict=True):
        for rule in result.violated:
            violated_in.setdefault(rule.id, []).append(index)
    violations = []
    for rule in compiled.rules:
        if rule.id in violated_in:
            first = violated_in[rule.id][0]
            violations.append(
                _violation(rule, results[indices.index(first)].assessments, options, first, violated_in[rule.id])
            )
    considered = {rule.id for result in results for rule in result.relevant}
    unique = list({id(result): result for result in results}.values())
    decided = Counter(
        a.decided_by.value for result in unique for a in result.assessments.values() if a.outcome != Outcome.NOT_EVALUATED
    )
    clock.add("total_ms", started)
    constitution = compiled.constitution
    return Verdict(
        safe=not violations,
        constitution=constitution.name,
        constitution_version=constitution.version,
        violations=violations,
        rules_considered=[rule.id for rule in compiled.rules if rule.id in considered],
        rules_skipped_by_relevance=[rule.id for rule in compiled.rules if rule.id not in considered],
        mllm_calls=counter.calls,
        questions_scored=counter.questions_scored,
        reasoning_calls=counter.reasoning_calls,
        evaluator=evaluator,
        model_id=counter.models.mllm.model_id,
        timing=clock.timing,
        frame_count=frame_count,
        frames_judged=indices,
        preconditions_decided=dict(sorted(decided.items())),
        explanation=_explanation(compiled, results, indices, thresholds) if options.explain else None,
    )


def _explanation(
    compiled: CompiledConstitution, results: list[_FrameResult], indices: list[int], thresholds: Thresholds
) -> Explanation:
    """Every rule of every judged frame: its cosine, whether it was considered, its outcome and chain."""
    frames = []
    for result, index in zip(results, indices, strict=True):
        considered = {rule.id for rule in result.relevant}
        rules = [
            RuleExplanation(
                rule_id=rule.id,
                title=rule.title,
                text=rule.text,
                severity=rule.severity.value,
                relevance=result.relevance.get(rule.id),
                considered=rule.id in considered,
                outcome=_rule_outcome(rule, result.assessments) if rule.id in considered else Outcome.NOT_EVALUATED,
                preconditions=_evidence(rule, result.assessments, index, unevaluated=True),
            )
            for rule in compiled.rules
        ]
        frames.append(FrameExplanation(frame=index, rules=rules, views=result.views))
    return Explanation(thresholds=thresholds.model_dump(), frames=frames)


EVALUATORS: dict[str, Callable[..., Verdict]] = {"sequential": judge_sequential, "batched": judge_batched}
