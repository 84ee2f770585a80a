"""`safejudge explain`: one verdict made readable, in the terminal (rich) and as one self-contained HTML page.

The verdict's explanation (OPTIONS `{"explain": true}`) carries scores, deciding tests and Strategy 2 boxes,
never pixels: the views are recomputed here from the original image and the boxes with the engine's own
`strategy2_view`, so the page shows exactly what the MLLM was asked about.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from rich.console import Group
from rich.table import Table
from rich.text import Text

from safejudge.evaluators import JudgeOptions, judge_frames, strategy2_view
from safejudge.images import DecodedImage, decode_image
from safejudge_client.verdict import (
    DecidedBy,
    Explanation,
    FrameExplanation,
    Outcome,
    PreconditionEvidence,
    RuleExplanation,
    Strategy2View,
    Verdict,
    ViewKind,
)

if TYPE_CHECKING:
    from safejudge.backends.registry import ModelSpec
    from safejudge_client import JudgeClient

INLINE_PNG_MAX_PIXELS = 1_000_000  # larger images are embedded as JPEG, which keeps the page a few MB


class ExplainError(ValueError):
    """A verdict that cannot be explained: no explanation in it, or frames that do not match the image."""


def explanation_of(verdict: Verdict) -> Explanation:
    if verdict.explanation is None:
        raise ExplainError("the verdict has no explanation: the server did not honour OPTIONS {\"explain\": true}")
    return verdict.explanation


def judged_frames(verdict: Verdict, decoded: DecodedImage) -> dict[int, Image.Image]:
    """The frames the verdict explains, by file index, from the decoded original image."""
    by_index = dict(zip(decoded.frame_indices, decoded.frames, strict=True))
    wanted = [frame.frame for frame in explanation_of(verdict).frames]
    missing = [index for index in wanted if index not in by_index]
    if missing:
        raise ExplainError(
            f"the verdict explains frames {wanted} but the image decodes to frames {list(by_index)}: "
            "is it the image that was judged?"
        )
    return {index: by_index[index] for index in wanted}


# --- words shared by the terminal and the page ---------------------------------------------------------

_TESTS = {
    DecidedBy.ALPHA1: "α1: absent",
    DecidedBy.ALPHA2: "α2: present",
    DecidedBy.BETA: "β: Strategy 2",
    DecidedBy.REASONING: "reasoning",
    DecidedBy.REASONING_UNPARSED: "unparsed reasoning",
    DecidedBy.REASONING_BUDGET: "reasoning budget",
}


def _word(value: Enum | str) -> str:
    """An enum field's value; a value a newer server added is kept as a plain string (OpenEnum)."""
    return value.value if isinstance(value, Enum) else value


def deciding_test(evidence: PreconditionEvidence) -> str:
    """Which test decided a precondition, in words; 'not needed' when the rule was decided without it."""
    if evidence.outcome == Outcome.NOT_EVALUATED:
        return "not evaluated"
    if evidence.decided_by == DecidedBy.NONE:
        return "not needed" if evidence.outcome == Outcome.INCONCLUSIVE else "none"
    return _TESTS.get(evidence.decided_by, _word(evidence.decided_by))


def rule_status(rule: RuleExplanation) -> str:
    if not rule.considered:
        return "skipped"
    return {Outcome.SATISFIED: "VIOLATED", Outcome.FAILED: "not violated"}.get(rule.outcome, _word(rule.outcome))


def relevance_text(rule: RuleExplanation, thresholds: Mapping[str, float]) -> str:
    if rule.relevance is None:
        return "relevance filter off"
    return f"relevance {rule.relevance:.3f} {'>' if rule.considered else '≤'} t {thresholds['relevance']:.2f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def score_text(evidence: PreconditionEvidence) -> str:
    """M, marked when the crop of a tiny central object replaced the image."""
    return _number(evidence.score) + (" (crop)" if evidence.view == ViewKind.CROP else "")


def item_label(evidence: PreconditionEvidence, rule: RuleExplanation) -> str:
    """'2' for a one-alternative item, '2b' for the second alternative of item 2 (1-based)."""
    alternatives = sum(1 for e in rule.preconditions if e.item == evidence.item)
    return f"{evidence.item + 1}" + (chr(ord("a") + evidence.alternative) if alternatives > 1 else "")


def thresholds_text(thresholds: Mapping[str, float]) -> str:
    return (
        f"t {thresholds['relevance']:.2f} · α1 {thresholds['alpha1_factor']:g}·M0 · "
        f"α2 {thresholds['alpha2_factor']:g}·(1−M0) · β {thresholds['beta']:g} · "
        f"detector > {thresholds['detector_confidence']:g} · "
        f"crop < {thresholds['crop_area_fraction']:.0%} of the image"
    )


def verdict_line(verdict: Verdict) -> str:
    label = "SAFE" if verdict.safe else "UNSAFE"
    return (
        f"{label} under {verdict.constitution} v{verdict.constitution_version} · {verdict.model_id} "
        f"({verdict.evaluator}) · {verdict.mllm_calls} MLLM calls, {verdict.reasoning_calls} reasoning · "
        f"{verdict.timing.total_ms:.0f} ms"
    )


# --- terminal ------------------------------------------------------------------------------------------

_STATUS_STYLE = {"VIOLATED": "bold red", "not violated": "green", "skipped": "dim"}


def _rule_table(rule: RuleExplanation, thresholds: Mapping[str, float]) -> Table:
    status = rule_status(rule)
    title = Text.assemble(
        "\n", (rule.rule_id, "bold"), f" {rule.title} · ", (status, _STATUS_STYLE.get(status, "")),
        f" · {relevance_text(rule, thresholds)}\n", (rule.text, "italic"),
    )
    table = Table(title=title, title_justify="left", expand=True)
    table.add_column("#", no_wrap=True)
    table.add_column("precondition", ratio=1, overflow="fold")
    for name in ("M", "M0", "M⊖"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("decided by", no_wrap=True)
    for evidence in rule.preconditions:
        text = Text(evidence.text)
        if evidence.rationale:
            text.append(f"\n{evidence.rationale}", style="italic dim")
        table.add_row(
            item_label(evidence, rule), text, score_text(evidence), _number(evidence.prior),
            _number(evidence.score_without_center), Text(_word(evidence.outcome)), Text(deciding_test(evidence)),
        )
    return table


def _views_table(views: list[Strategy2View]) -> Table:
    table = Table(title="Strategy 2 views", title_justify="left")
    for name in ("central object", "view", "box (l, t, r, b)", "confidence"):
        table.add_column(name, no_wrap=True)
    for view in views:
        table.add_row(Text(view.central_object), Text(_word(view.kind)), ", ".join(map(str, view.box)),
                      f"{view.confidence:.3f}")
    return table


def _skipped_table(rules: list[RuleExplanation], thresholds: Mapping[str, float]) -> Table:
    table = Table(title="Skipped by relevance (nothing asked)", title_justify="left", expand=True)
    table.add_column("rule", no_wrap=True)
    table.add_column("title", ratio=1, overflow="fold")
    table.add_column("relevance", no_wrap=True)
    for rule in rules:
        table.add_row(rule.rule_id, Text(rule.title), relevance_text(rule, thresholds))
    return table


def terminal_view(verdict: Verdict) -> Group:
    """The verdict for a terminal: a table per considered rule, the skipped ones and the Strategy 2 views."""
    explanation = explanation_of(verdict)
    style = "bold green" if verdict.safe else "bold red"
    parts: list = [Text(verdict_line(verdict), style=style), Text(thresholds_text(explanation.thresholds), style="dim")]
    for frame in explanation.frames:
        if len(explanation.frames) > 1:
            parts.append(Text(f"\nframe {frame.frame}", style="bold underline"))
        parts.extend(_rule_table(rule, explanation.thresholds) for rule in frame.rules if rule.considered)
        skipped = [rule for rule in frame.rules if not rule.considered]
        if skipped:
            parts.append(_skipped_table(skipped, explanation.thresholds))
        if frame.views:
            parts.append(_views_table(frame.views))
    return Group(*parts)


# --- HTML ----------------------------------------------------------------------------------------------


def data_uri(image: Image.Image) -> str:
    """The image as a data: URI: PNG, or JPEG for large images."""
    buffer = io.BytesIO()
    if image.width * image.height <= INLINE_PNG_MAX_PIXELS:
        image.save(buffer, format="PNG")
        mime = "image/png"
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


@dataclass(frozen=True)
class _PageView:
    view: Strategy2View
    uri: str
    box_percent: tuple[float, float, float, float]  # left, top, width, height in % of the frame


@dataclass(frozen=True)
class _PageFrame:
    frame: FrameExplanation
    uri: str
    views: list[_PageView]


def _page_frame(frame: FrameExplanation, image: Image.Image) -> _PageFrame:
    views = []
    for view in frame.views:
        left, top, right, bottom = view.box
        percent = (100 * left / image.width, 100 * top / image.height,
                   100 * (right - left) / image.width, 100 * (bottom - top) / image.height)
        if view.kind not in tuple(ViewKind):
            raise ExplainError(f"unknown Strategy 2 view kind {view.kind!r} for {view.central_object!r}")
        views.append(_PageView(view, data_uri(strategy2_view(image, view.box, view.kind)), percent))
    return _PageFrame(frame, data_uri(image), views)


def html_page(verdict: Verdict, frames: Mapping[int, Image.Image]) -> str:
    """One self-contained page: images as data: URIs, inline CSS, no script, every text HTML-escaped."""
    import jinja2

    explanation = explanation_of(verdict)
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    template = environment.from_string(files("safejudge").joinpath("templates/explain.html").read_text())
    return template.render(
        verdict=verdict,
        explanation=explanation,
        frames=[_page_frame(frame, frames[frame.frame]) for frame in explanation.frames],
        verdict_line=verdict_line(verdict),
        thresholds_text=thresholds_text(explanation.thresholds),
        rule_status=rule_status,
        relevance_text=lambda rule: relevance_text(rule, explanation.thresholds),
        deciding_test=deciding_test,
        score_text=score_text,
        number=_number,
        item_label=item_label,
        word=_word,
    )


# --- getting an explained verdict ----------------------------------------------------------------------


@dataclass(frozen=True)
class Explained:
    """An explained verdict and the frames it explains (file index -> the decoded frame)."""

    verdict: Verdict
    frames: dict[int, Image.Image]


def explain_local(data: bytes, constitution: str, spec: ModelSpec, constitutions: Path) -> Explained:
    """Judge in process as the server would: the spec's models, the directory's constitution (calibration and
    compiled cache included), OPTIONS {"explain": true}."""
    from safejudge.backends.registry import load_models
    from safejudge.store import ConstitutionStore

    models = load_models(spec)
    compiled = ConstitutionStore(constitutions, models).get(constitution)
    decoded = decode_image(data)
    verdict = judge_frames(
        decoded.frames, compiled, models, JudgeOptions(explain=True),
        frame_indices=decoded.frame_indices, frame_count=decoded.frame_count,
    )
    return Explained(verdict, judged_frames(verdict, decoded))


def explain_served(data: bytes, constitution: str, client: JudgeClient) -> Explained:
    """Ask a server for the explained verdict; the frames are decoded here, sampled as the server sampled them."""
    verdict = client.judge(data, constitution, JudgeOptions(explain=True))
    return Explained(verdict, judged_frames(verdict, decode_image(data, frames=len(verdict.frames_judged))))
