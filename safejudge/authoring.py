"""Constitution authoring: an offline lint, and the paper's two LLM steps (objectify, extract preconditions).

CLUE's offline stage: an LLM rates each rule's objectiveness 1-10 and rewrites it until it reaches 9,
then turns it into a precondition chain (AND of items, each an OR of alternatives) with central-object
words. The lint catches, without any model, the wording those steps exist to remove.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from safejudge.constitution import Constitution, Precondition, Rule
from safejudge.llm import ChatMessage, TextLLM

# --------------------------------------------------------------------------------------------
# Lint
# --------------------------------------------------------------------------------------------

MAX_PRECONDITION_WORDS = 20
MAX_CENTRAL_OBJECT_WORDS = 3


class LintCode(str, Enum):
    SUBJECTIVE = "subjective"
    NOT_VISIBLE = "not-visible"
    TOO_LONG = "too-long"


class LintFinding(BaseModel):
    rule_id: str
    field: str = Field(description="where in the rule, e.g. text or preconditions[2][0]")
    code: LintCode
    message: str

    def format(self, source: str) -> str:
        return f"{source}: rule {self.rule_id}: {self.field}: [{self.code.value}] {self.message}"


# Words that ask the judge for an opinion instead of a visible fact.
_SUBJECTIVE = re.compile(
    r"\b(inappropriate\w*|offensive\w*|disturbing|harmful|explicit\w*|graphic(?:ally)?|suggestive\w*|"
    r"obscen\w*|indecen\w*|vulgar\w*|provocative\w*|sexy|lewd\w*|racy|nsfw|gory|gruesome|disgusting|"
    r"objectionable|distasteful|improper\w*|unsafe|problematic|questionable|excessive\w*|shocking|"
    r"upsetting|tasteless|immoral|revealing|seductive\w*)\b",
    re.IGNORECASE,
)

# What a picture cannot show, with the reason a judge cannot answer it from pixels.
_NOT_VISIBLE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(intends?|intent(ions?)?|intended|wants? to|plans? to|meant to|purpose)\b", re.I),
     "intent cannot be seen"),
    (re.compile(r"\b(will|going to|about to|is likely to|could lead to)\b", re.I),
     "a future event cannot be seen"),
    (re.compile(r"\b(illegal in|legal in|against the law|consent(s|ed|ing)?|in real life|"
                r"outside the (image|frame|picture|photo)|before the (photo|picture)|after the (photo|picture)|"
                r"was taken)\b", re.I),
     "needs context from outside the image"),
    (re.compile(r"\b(sounds?|heard|hears?|loud|noise|audio|smells?|odou?r)\b", re.I),
     "sounds and smells are not in an image"),
    (re.compile(r"\b(feels?|thinks?|believes?|knows?)\b", re.I),
     "thoughts and feelings cannot be seen"),
]

# Age stated as a fact rather than as a visible cue ("looks like a child" is fine, "under 18" is not).
_AGE_CLAIM = re.compile(
    r"\b(underage|under-?age|minors?|under \d+|\d+\s*(years?|yrs?)[ -]old|of legal age|teen(ager)?s?)\b", re.I
)
_AGE_CUE = re.compile(r"\b(appears?|looks?|body size|face of)\b", re.I)


def _statement_findings(rule_id: str, field: str, statement: str, *, precondition: bool) -> list[LintFinding]:
    findings = [
        LintFinding(rule_id=rule_id, field=field, code=LintCode.SUBJECTIVE,
                    message=f"subjective word {match.group(0)!r}: name the visible criterion instead")
        for match in _SUBJECTIVE.finditer(statement)
    ]
    for pattern, reason in _NOT_VISIBLE:
        match = pattern.search(statement)
        if match:
            findings.append(LintFinding(rule_id=rule_id, field=field, code=LintCode.NOT_VISIBLE,
                                        message=f"{match.group(0)!r}: {reason}"))
    age = _AGE_CLAIM.search(statement)
    if age and not _AGE_CUE.search(statement):
        findings.append(LintFinding(rule_id=rule_id, field=field, code=LintCode.NOT_VISIBLE,
                                    message=f"{age.group(0)!r}: an age cannot be seen; name the visible cue"))
    words = len(statement.split())
    if precondition and words > MAX_PRECONDITION_WORDS:
        findings.append(LintFinding(rule_id=rule_id, field=field, code=LintCode.TOO_LONG,
                                    message=f"{words} words (at most {MAX_PRECONDITION_WORDS}): split it into items"))
    return findings


def lint_rule(rule: Rule) -> list[LintFinding]:
    findings = _statement_findings(rule.id, "text", rule.text, precondition=False)
    for i, item in enumerate(rule.preconditions):
        for j, alternative in enumerate(item):
            field = f"preconditions[{i}]" if len(item) == 1 else f"preconditions[{i}][{j}]"
            findings += _statement_findings(rule.id, field, alternative.text, precondition=True)
            central = alternative.central_object
            if central and len(central.split()) > MAX_CENTRAL_OBJECT_WORDS:
                findings.append(LintFinding(
                    rule_id=rule.id, field=f"{field}.central_object", code=LintCode.TOO_LONG,
                    message=f"{central!r}: a central object is one detectable thing, at most "
                            f"{MAX_CENTRAL_OBJECT_WORDS} words"))
    return findings


def lint(constitution: Constitution) -> list[LintFinding]:
    """Offline checks of every rule's text and preconditions (disabled rules too: they may be enabled later)."""
    return [finding for rule in constitution.rules for finding in lint_rule(rule)]


# --------------------------------------------------------------------------------------------
# Reading LLM answers
# --------------------------------------------------------------------------------------------


class LLMAnswerError(ValueError):
    """The LLM answered, but not in the form asked for."""


def _excerpt(text: str) -> str:
    return repr(text.strip()[:200])


def _json_values(text: str) -> list[Any]:
    """Every top-level JSON object or array in free text (models wrap JSON in prose and code fences)."""
    decoder = json.JSONDecoder()
    values, start = [], 0
    while start < len(text):
        if text[start] in "[{":
            try:
                value, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                start += 1
                continue
            values.append(value)
            start = end
        else:
            start += 1
    return values


# --------------------------------------------------------------------------------------------
# Objectify: rate 1-10, rewrite until the rating reaches the target
# --------------------------------------------------------------------------------------------

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of safety rules."

JUDGE_PROMPT = """[Instruction]
Act as an impartial judge and rate how objective the image-safety rule below is. A rule is objective when
two people looking at the same image would always agree whether it is violated: it names concrete things
that are visible (body parts, objects, actions, positions, text), not opinions ("inappropriate",
"offensive"), intent, age without visible cues, sounds, or anything outside the image.
Begin with a short explanation. Then rate the rule from 1 to 10 strictly in this format: "Rating: [[N]]",
for example "Rating: [[5]]".

[Rule]
{rule}"""

REWRITE_PROMPT = """Rewrite the image-safety rule below so that it is fully objective: keep its intent, but
replace every opinion word with the concrete visible content it refers to (body parts, objects, actions,
positions, measurable quantities such as angles or counts), and remove anything that cannot be seen in a
single image. A judge rated it {rating}/10 and explained:
{explanation}

[Rule]
{rule}

Answer with the rewritten rule only, one or two sentences, no preamble."""

_RATING = re.compile(r"Rating:\s*\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)
_BARE_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


class ObjectifyRound(BaseModel):
    round: int = Field(ge=0, description="0 is the rule as given; each later round is one rewrite")
    text: str
    rating: float = Field(ge=1, le=10)
    explanation: str


class ObjectifyResult(BaseModel):
    original: str
    text: str = Field(description="the best-rated version")
    rating: float
    reached_target: bool
    log: list[ObjectifyRound]


def parse_rating(answer: str) -> tuple[float, str]:
    """(rating, explanation) from an MT-Bench-style judge answer ending in "Rating: [[N]]"."""
    match = _RATING.search(answer) or _BARE_RATING.search(answer)
    if not match:
        raise LLMAnswerError(f"the judge's answer has no 'Rating: [[N]]': {_excerpt(answer)}")
    rating = float(match.group(1))
    if not 1 <= rating <= 10:
        raise LLMAnswerError(f"the judge's rating {rating:g} is outside 1-10: {_excerpt(answer)}")
    return rating, answer[: match.start()].strip() or answer.strip()


_PREAMBLE = re.compile(r"^\s*(rewritten rule|revised rule|rule)\s*:\s*", re.IGNORECASE)


def parse_rewrite(answer: str) -> str:
    text = answer.strip().strip("`").strip()
    text = _PREAMBLE.sub("", text).strip().strip('"').strip()
    text = " ".join(text.split())
    if len(text) < 10:
        raise LLMAnswerError(f"the LLM's rewrite is empty or too short to be a rule: {_excerpt(answer)}")
    return text


def rate_objectiveness(rule_text: str, llm: TextLLM) -> tuple[float, str]:
    answer = llm.complete([
        ChatMessage(role="system", content=JUDGE_SYSTEM),
        ChatMessage(role="user", content=JUDGE_PROMPT.format(rule=rule_text)),
    ])
    return parse_rating(answer)


def objectify(rule_text: str, llm: TextLLM, *, target: float = 9, max_rounds: int = 4) -> ObjectifyResult:
    """Rate, then rewrite and re-rate up to max_rounds times until the rating reaches target."""
    rule_text = " ".join(rule_text.split())
    if not rule_text:
        raise ValueError("the rule text is empty")
    rating, explanation = rate_objectiveness(rule_text, llm)
    log = [ObjectifyRound(round=0, text=rule_text, rating=rating, explanation=explanation)]
    while log[-1].rating < target and len(log) <= max_rounds:
        previous = log[-1]
        rewrite = parse_rewrite(llm.complete([ChatMessage(role="user", content=REWRITE_PROMPT.format(
            rating=f"{previous.rating:g}", explanation=previous.explanation, rule=previous.text))]))
        rating, explanation = rate_objectiveness(rewrite, llm)
        log.append(ObjectifyRound(round=len(log), text=rewrite, rating=rating, explanation=explanation))
    # The latest version that reached the target, else the best one seen (ties: the later, more rewritten).
    best = max(reversed(log), key=lambda entry: entry.rating)
    return ObjectifyResult(original=rule_text, text=best.text, rating=best.rating,
                           reached_target=best.rating >= target, log=log)


# --------------------------------------------------------------------------------------------
# Preconditions: 2-shot extraction of an AND-of-OR chain with central objects
# --------------------------------------------------------------------------------------------

PRECONDITION_SYSTEM = (
    "You turn image-safety rules into precondition chains. Each precondition is a short statement about "
    "what is visible in an image, answerable Yes or No by looking at the image alone."
)

PRECONDITION_INSTRUCTION = """List the preconditions that must ALL hold for an image to violate the rule.
Answer with JSON only: {"preconditions": [item, ...]} where each item is either one precondition or a
list of alternatives of which at least one must hold (OR). A precondition is
{"text": "<short visible statement, at most 20 words>", "central_object": "<one word for the object that
carries the evidence, or null>"}.

Rule: """

_SHOTS = [
    (
        "A person or animal has bloody injuries, and the injuries are severe enough to indicate imminent death.",
        {"preconditions": [
            [{"text": "People are visible", "central_object": None},
             {"text": "Animals are visible", "central_object": None}],
            {"text": "Bloody injuries are visible on the body", "central_object": "wound"},
            [{"text": "A large pool of blood surrounds the body", "central_object": "blood"},
             {"text": "A wound exposes bone or internal organs", "central_object": "wound"}],
        ]},
    ),
    (
        "A person is kissing another person with their mouths open so that teeth are visible.",
        {"preconditions": [
            {"text": "Two people are visible", "central_object": None},
            {"text": "The lips of the two people touch each other", "central_object": "lips"},
            {"text": "Teeth are visible between the open mouths", "central_object": "teeth"},
        ]},
    ),
]


def precondition_messages(rule_text: str) -> list[ChatMessage]:
    messages = [ChatMessage(role="system", content=PRECONDITION_SYSTEM)]
    for rule, answer in _SHOTS:
        messages.append(ChatMessage(role="user", content=PRECONDITION_INSTRUCTION + rule))
        messages.append(ChatMessage(role="assistant", content=json.dumps(answer)))
    messages.append(ChatMessage(role="user", content=PRECONDITION_INSTRUCTION + rule_text))
    return messages


def parse_preconditions(answer: str) -> list[list[Precondition]]:
    """Read {"preconditions": [...]} (or a bare list) into the schema's AND-of-OR chain, failing loudly."""
    values = _json_values(answer)
    if not values:
        raise LLMAnswerError(f"no JSON found in the LLM's answer: {_excerpt(answer)}")
    keyed = [value["preconditions"] for value in values if isinstance(value, dict) and "preconditions" in value]
    bare = [value for value in values if isinstance(value, list)]
    chain = (keyed or bare or [None])[0]
    if chain is None:
        raise LLMAnswerError(f"the LLM's JSON has no 'preconditions' list: {_excerpt(answer)}")
    try:
        # Validated as a Rule so the LLM's answer meets exactly what a constitution file must.
        return Rule.model_validate(
            {"id": "extracted", "title": "extracted", "category": "extracted", "text": "extracted",
             "preconditions": chain}
        ).preconditions
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise LLMAnswerError(f"the LLM's preconditions do not fit the schema ({problems}): {_excerpt(answer)}") from exc


def extract_preconditions(rule_text: str, llm: TextLLM) -> list[list[Precondition]]:
    return parse_preconditions(llm.complete(precondition_messages(rule_text)))


def rule_yaml(rule: Rule) -> str:
    """A rule as constitution YAML, in the compact form people write: one-alternative items unwrapped."""

    def precondition(p: Precondition) -> Any:
        return {"text": p.text, "central_object": p.central_object} if p.central_object else p.text

    data = rule.model_dump(mode="json", exclude_none=True, exclude={"preconditions", "enabled"})
    data["preconditions"] = [
        precondition(item[0]) if len(item) == 1 else [precondition(p) for p in item] for item in rule.preconditions
    ]
    return yaml.safe_dump([data], sort_keys=False, allow_unicode=True, width=100)


def draft_rule(rule_text: str, llm: TextLLM, *, rule_id: str, category: str, title: str | None = None) -> Rule:
    """A new constitution rule from objective rule text, its preconditions extracted by the LLM."""
    text = " ".join(rule_text.split())
    return Rule(id=rule_id, title=title or rule_id, category=category, text=text,
                preconditions=extract_preconditions(text, llm))
