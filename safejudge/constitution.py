"""Constitutions as validated data: pydantic models and YAML loading with file:line errors."""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Severity(str, Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Thresholds(BaseModel):
    """The paper's decision thresholds; any of them can be overridden per constitution or request.

    alpha1 = alpha1_factor * M0, alpha2 = alpha2_factor * (1 - M0), with M0 = M(None, c).
    """

    model_config = ConfigDict(extra="forbid")

    alpha1_factor: float = Field(-0.3, le=0.0)
    alpha2_factor: float = Field(0.8, ge=0.0, le=1.0)
    beta: float = Field(0.6, ge=0.0, le=1.0)
    relevance: float = Field(0.22, ge=-1.0, le=1.0, description="CLIP cosine threshold t")
    detector_confidence: float = Field(0.05, ge=0.0, le=1.0)
    crop_area_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="a box smaller than this share of the image replaces it"
    )

    def merged(self, overrides: dict[str, Any] | None) -> Thresholds:
        if not overrides:
            return self
        return Thresholds.model_validate({**self.model_dump(), **overrides})

    def loosened_by(self, overrides: dict[str, float]) -> list[str]:
        """The overrides that make the judgement more lenient than these thresholds (STRICTER_WHEN), each as
        `name: new (from base)`."""
        loosened = []
        for name, value in overrides.items():
            base = getattr(self, name)
            direction = STRICTER_WHEN[name]
            if value != base and (direction == "never" or (value > base) == (direction == "lower")):
                loosened.append(f"{name}: {value:g} (this constitution's is {base:g})")
        return loosened


# Which change of each threshold makes the judgement stricter (more preconditions hold, more rules checked),
# from the tests of safejudge/decision.py and safejudge/evaluators.py. "never": no direction is stricter.
STRICTER_WHEN: dict[str, str] = {
    "alpha1_factor": "lower",  # fails only if M - M0 < alpha1_factor * M0: lower fails fewer
    "alpha2_factor": "lower",  # holds if M - M0 > alpha2_factor * (1 - M0): lower holds more
    "beta": "lower",  # holds if removing the central object drops M by more than beta
    "relevance": "lower",  # a rule is checked iff cos > relevance
    "detector_confidence": "never",  # a box enables the beta test (may hold) but also the crop (may fail)
    "crop_area_fraction": "never",  # decides between the removed view and the crop: neither is stricter
}


class Precondition(BaseModel):
    """One yes/no visible-content statement, with the paper's optional central-object word."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=3)
    central_object: str | None = None

    @field_validator("text")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("must not be blank")
        return value


def _as_precondition(value: Any) -> Any:
    return {"text": value} if isinstance(value, str) else value


class Rule(BaseModel):
    """One objective rule with its precondition chain: an AND of items, each an OR of alternatives.

    In YAML an item is a statement, a mapping {text, central_object}, or a list of those (OR).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=64)
    title: str = Field(min_length=1)
    category: str = Field(min_length=1)
    text: str = Field(min_length=1, description="the objective rule, as the relevance filter reads it")
    original: str | None = Field(None, description="the rule before objectification")
    objectiveness: int | None = Field(None, ge=1, le=10)
    severity: Severity = Severity.HIGH
    enabled: bool = True
    preconditions: list[list[Precondition]] = Field(description="AND of items; each item an OR")

    @field_validator("preconditions", mode="before")
    @classmethod
    def _normalise_items(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [
            [_as_precondition(alt) for alt in item] if isinstance(item, list) else [_as_precondition(item)]
            for item in value
        ]

    @field_validator("preconditions")
    @classmethod
    def _non_empty_chain(cls, value: list[list[Precondition]]) -> list[list[Precondition]]:
        if not value:
            raise ValueError("must not be empty")
        for index, item in enumerate(value):
            if not item:
                raise ValueError(f"item {index} must not be empty")
        return value

    def questions(self) -> list[str]:
        """Every distinct precondition statement of this rule, in chain order."""
        return list(dict.fromkeys(alt.text for item in self.preconditions for alt in item))


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    version: str = Field(min_length=1)
    description: str = ""
    thresholds: Thresholds = Field(default_factory=Thresholds)
    rules: list[Rule] = Field(min_length=1)

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @model_validator(mode="after")
    def _unique_ids(self) -> Constitution:
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.id in seen:
                # The location leads the message: a model-level check has no field of its own.
                raise ValueError(f"rules[{index}].id: duplicate rule id {rule.id!r}")
            seen.add(rule.id)
        return self

    @property
    def enabled_rules(self) -> list[Rule]:
        return [rule for rule in self.rules if rule.enabled]

    def rule(self, rule_id: str) -> Rule:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    def content_hash(self) -> str:
        """Stable hash of the validated content (not of the YAML formatting)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ConstitutionError(ValueError):
    """A constitution file that cannot be used; the message names file, line and field."""


_DUPLICATE_AT = re.compile(r"^rules\[(\d+)\]\.id: (.*)$")


def _node_lines(node: yaml.Node, path: tuple = (), lines: dict | None = None) -> dict[tuple, int]:
    """Map every value's path (as pydantic reports it) to its 1-based line in the YAML."""
    lines = {} if lines is None else lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            _node_lines(value_node, (*path, key_node.value), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            _node_lines(child, (*path, index), lines)
    return lines


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int:
    # A missing field has no node of its own: report the nearest enclosing one.
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


# Bounds on the YAML itself, far beyond any constitution (rules > preconditions > alternatives is 5 deep):
# the composer recurses per level, and aliases make every later pass walk each reference in full.
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000


def _check_yaml_shape(text: str, source: str) -> None:
    """Refuse YAML nested deeper than MAX_YAML_DEPTH or holding more than MAX_YAML_VALUES values once its
    aliases are expanded ("billion laughs"). Reads the parser's events, which takes no recursion and
    one step per event, so neither check can itself be exhausted."""
    expanded: dict[str, int] = {}  # anchor -> values under it, aliases expanded
    open_collections: list[list] = [[None, 0]]  # [anchor, values so far]; the first entry is the stream
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_collections.append([event.anchor, 1])
            if len(open_collections) - 1 > MAX_YAML_DEPTH:
                raise ConstitutionError(
                    f"{source}:{event.start_mark.line + 1}: YAML nests deeper than {MAX_YAML_DEPTH} levels"
                )
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, values = open_collections.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, values = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, values = None, expanded.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            expanded[anchor] = values
        open_collections[-1][1] += values
        if open_collections[0][1] + sum(values for _, values in open_collections[1:]) > MAX_YAML_VALUES:
            raise ConstitutionError(
                f"{source}:1: YAML holds more than {MAX_YAML_VALUES} values once its aliases are expanded"
            )


def parse_constitution(text: str, source: str = "<string>") -> Constitution:
    """Validate YAML text; every problem becomes a ConstitutionError naming source:line: field."""
    try:
        _check_yaml_shape(text, source)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConstitutionError(f"{source}:{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if node is None or not isinstance(data, dict):
        raise ConstitutionError(f"{source}:1: a constitution must be a YAML mapping")
    try:
        return Constitution.model_validate(data)
    except ValidationError as exc:
        lines = _node_lines(node)
        messages = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            reason = error["msg"].removeprefix("Value error, ")
            located = _DUPLICATE_AT.match(reason)
            if located:
                loc, reason = ("rules", int(located.group(1)), "id"), located.group(2)
            if error["type"] == "extra_forbidden":
                reason = "unknown key"
            messages.append(f"{source}:{_line_for(loc, lines)}: {_format_loc(loc)}: {reason}")
        messages.sort(key=lambda m: int(m.split(":")[1]))
        raise ConstitutionError("\n".join(messages)) from exc


def validation_summary(exc: ValidationError, whole: str = "value") -> str:
    """A pydantic error as one readable line: each `field.path: reason`, `whole` naming an error of the
    whole object."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or whole}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
    )


def load_constitution(path: str | Path) -> Constitution:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConstitutionError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_constitution(text, source=path.name)


def load_directory(directory: str | Path) -> dict[str, Constitution]:
    """Every *.yaml constitution in a directory, by name; duplicate names are an error."""
    found: dict[str, Constitution] = {}
    for path in sorted(Path(directory).glob("*.y*ml")):
        constitution = load_constitution(path)
        if constitution.name in found:
            raise ConstitutionError(f"{path.name}:1: name: {constitution.name!r} is already used by another file")
        found[constitution.name] = constitution
    return found
