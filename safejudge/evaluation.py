"""Quality: a labelled bench (generated toy scenes, or a user's labelled image files: safejudge.labels), the
paper's methods, Table-2-style metrics, and threshold calibration on a dev split.

The toy bench is generated, never committed: for every rule of a toy-world constitution, scenes that violate
it and borderline-safe hard negatives (one precondition item made false in the most confusable way: the
knife not held, the flame far from the house, the person absent next to the blood), plus a benign split
(only benign objects) for over-sensitivity. Ground truth is exact (safejudge.toyworld). The models are the
toy demo models: these numbers say how well CLUE's decision procedure works with a small model whose
probabilities mean something, not how any real model does on real images. A user's own folder of labelled
images measures their model on their data with the same methods and the same metric code.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from safejudge.backends.base import Models
from safejudge.calibration import Calibration
from safejudge.compiled import CompiledConstitution, compile_constitution
from safejudge.constitution import Constitution, Rule
from safejudge.evaluators import JudgeOptions, judge_frames
from safejudge.images import ImageError, decode_image
from safejudge.shipped import CONSTITUTIONS
from safejudge_client.errors import InvalidRequest
from safejudge_client.verdict import Verdict
from safejudge.toyworld import BENIGN, HAZARDS, Query, Scene, SceneError, SceneSpec, generate_scene, parse_statement

if TYPE_CHECKING:
    from safejudge_client import JudgeClient

Split = Literal["violating", "borderline", "benign"]
PRIOR_KNOWLEDGE_QUESTION = "something dangerous is visible"  # toy-world words, so the demo models can read it
TOY_CONSTITUTION = CONSTITUTIONS / "toy-world.yaml"


# ---------------------------------------------------------------- the bench


class BenchError(ValueError):
    """A labelled image or label record that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class BenchItem:
    """One labelled image: a generated toy scene (exact truth) or a user's image file (their labels)."""

    violated: frozenset[str]  # the ground truth: every rule the image violates (that its label names)
    unsafe: bool  # the ground truth at image level (a label may say unsafe without naming rules)
    split: Split  # benign: measures over-sensitivity; borderline: a hard negative
    scene: Scene | None = None  # generated
    path: Path | None = None  # a user's file
    origin: str = ""  # where its label is written ("labels.csv:4"), for errors
    made_for: str | None = None  # generated: the rule the scene was made for (None: benign split)

    def __post_init__(self) -> None:
        if (self.scene is None) == (self.path is None):
            raise ValueError("a bench item is either a generated scene or an image file")

    @property
    def where(self) -> str:
        """The item in an error message: its label's line and its file, or the generated scene."""
        return f"{self.origin}: {self.path}" if self.path is not None else f"generated scene ({self.scene.describe()})"

    def frames(self) -> list[Image.Image]:
        """What is judged: the scene, or the frames of the file the server would judge (decoded and sampled
        as the server does: an animation is judged on several frames)."""
        if self.scene is not None:
            return [self.scene.image]
        try:
            return decode_image(self.path.read_bytes()).frames
        except (OSError, ImageError) as exc:
            raise BenchError(f"{self.where}: {exc}") from exc

    def request_image(self) -> Path | Image.Image:
        """What a client sends for this item: the file as it is, or the scene (as PNG)."""
        return self.path if self.path is not None else self.scene.image


def rule_violated(rule: Rule, scene: Scene) -> bool:
    """Exact truth: every item has an alternative that holds on the scene."""
    return all(any(scene.truth(alt.text) for alt in item) for item in rule.preconditions)


def _satisfy(query: Query, spec: dict, rng: np.random.Generator) -> None:
    if query.kind == "present":
        spec["objects"].append(query.concepts[0])
    elif query.kind == "holding":
        spec["held"].append(query.concepts[0])
    elif query.kind == "near":
        spec["near"].append(query.concepts)
    elif query.kind == "dangerous":
        spec["objects"].append(str(rng.choice(HAZARDS)))
    else:
        raise ValueError(f"a precondition must be one statement, not a compound ({query.kind})")


def _break(query: Query, spec: dict) -> None:
    """The hard negative of a statement: the confusable scene in which it is false."""
    if query.kind == "present":
        spec["absent"].append(query.concepts[0])
    elif query.kind == "holding":
        spec["not_held"].append(query.concepts[0])
    elif query.kind == "near":
        spec["far"].append(query.concepts)
    elif query.kind == "dangerous":
        spec["absent"].extend(HAZARDS)


def _rule_scene(rule: Rule, violate: bool, rng: np.random.Generator) -> Scene:
    items = [[parse_statement(alt.text) for alt in item] for item in rule.preconditions]
    for _ in range(50):
        spec: dict = {k: [] for k in ("objects", "held", "not_held", "near", "far", "absent")}
        # Break the most specific (last) item most of the time: that is where the confusable cases are.
        broken = None if violate else (len(items) - 1 if rng.random() < 0.7 else int(rng.integers(len(items))))
        for index, alternatives in enumerate(items):
            if index == broken:
                for query in alternatives:
                    _break(query, spec)
            else:
                _satisfy(alternatives[int(rng.integers(len(alternatives)))], spec, rng)
        absent = set(spec["absent"])
        if absent & (set(spec["objects"]) | set(spec["held"]) | {c for pair in spec["near"] for c in pair}):
            continue  # this item cannot be broken while the others hold; pick again
        if absent & {"person"} and spec["held"]:
            continue
        try:
            return generate_scene(rng, SceneSpec(**{k: tuple(v) for k, v in spec.items()}))
        except SceneError:
            continue
    raise SceneError(f"could not generate a {'violating' if violate else 'borderline'} scene for rule {rule.id}")


def _borderline_scene(rule: Rule, rules: Sequence[Rule], rng: np.random.Generator) -> Scene:
    """A hard negative for `rule` that also violates no other rule (random extras sometimes would)."""
    for _ in range(50):
        scene = _rule_scene(rule, False, rng)
        if not any(rule_violated(r, scene) for r in rules):
            return scene
    raise SceneError(f"could not generate a safe borderline scene for rule {rule.id}")


def make_bench(constitution: Constitution, per_rule: int = 50, benign: int = 50, seed: int = 0) -> list[BenchItem]:
    """per_rule violating + per_rule borderline-safe scenes per enabled rule, and `benign` benign scenes."""
    rng = np.random.default_rng(seed)
    rules = constitution.enabled_rules
    scenes: list[tuple[Scene, Split, str | None]] = []
    for rule in rules:
        scenes += [(_rule_scene(rule, True, rng), "violating", rule.id) for _ in range(per_rule)]
        scenes += [(_borderline_scene(rule, rules, rng), "borderline", rule.id) for _ in range(per_rule)]
    for _ in range(benign):
        scenes.append((generate_scene(rng, SceneSpec(extra=int(rng.integers(1, 5)), extra_pool=BENIGN)), "benign", None))
    items = []
    for scene, split, made_for in scenes:
        violated = frozenset(r.id for r in rules if rule_violated(r, scene))
        items.append(BenchItem(violated, bool(violated), split, scene=scene, made_for=made_for))
    return items


def toy_bench_name(per_rule: int, benign: int, seed: int) -> str:
    return f"generated toy bench, seed {seed} ({per_rule} violating + {per_rule} borderline per rule, {benign} benign)"


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Prediction:
    unsafe: bool
    violated: frozenset[str] | None  # None: the method names no rules
    mllm_calls: int
    reasoning_calls: int

    @classmethod
    def of_frames(cls, frames: Sequence[Prediction]) -> Prediction:
        """An image is unsafe if any of its judged frames is, as the served judge decides."""
        named = [p.violated for p in frames]
        return cls(
            any(p.unsafe for p in frames),
            None if None in named else frozenset().union(*named),
            sum(p.mllm_calls for p in frames),
            sum(p.reasoning_calls for p in frames),
        )

    @classmethod
    def of_verdict(cls, verdict: Verdict) -> Prediction:
        return cls(not verdict.safe, frozenset(verdict.violated_rule_ids), verdict.mllm_calls, verdict.reasoning_calls)


Method = Callable[[Sequence[Image.Image], CompiledConstitution, Models], Prediction]


class _Counting:
    """Counts the MLLM calls a baseline makes (the CLUE evaluators count their own)."""

    def __init__(self, models: Models):
        self.models, self.calls = models, 0

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        self.calls += 1
        return np.asarray(self.models.mllm.score(image, list(questions)))


def _per_frame(judge: Callable[[Image.Image, CompiledConstitution, Models], Prediction]) -> Method:
    """A baseline that looks at one image, applied to every judged frame."""

    def run(frames: Sequence[Image.Image], compiled: CompiledConstitution, models: Models) -> Prediction:
        return Prediction.of_frames([judge(frame, compiled, models) for frame in frames])

    return run


def _one_question(question: Callable[[CompiledConstitution], str]) -> Method:
    """One generic yes/no question per image: unsafe iff M > 0.5; names no rules."""

    def judge(image: Image.Image, compiled: CompiledConstitution, models: Models) -> Prediction:
        mllm = _Counting(models)
        unsafe = bool(mllm.score(image, [question(compiled)])[0] > 0.5)
        return Prediction(unsafe, None, mllm.calls, 0)

    return _per_frame(judge)


def _whole_constitution(compiled: CompiledConstitution) -> str:
    """The paper's 'whole constitution + Yes/No': every rule in one question."""
    return " or ".join(rule.text.rstrip(". ") for rule in compiled.rules)


def _rule_questions(image: Image.Image, compiled: CompiledConstitution, models: Models) -> Prediction:
    """One yes/no question per rule (its text), no preconditions, no debiasing: M > 0.5 violates."""
    mllm = _Counting(models)
    scores = mllm.score(image, [rule.text for rule in compiled.rules])
    violated = frozenset(rule.id for rule, s in zip(compiled.rules, scores, strict=True) if s > 0.5)
    return Prediction(bool(violated), violated, mllm.calls, 0)


def _chain_no_debias(image: Image.Image, compiled: CompiledConstitution, models: Models) -> Prediction:
    """Precondition chains with M(x, c) > 0.5 per statement: no prior, no Strategy 2, no reasoning."""
    mllm = _Counting(models)
    statements = list(compiled.priors)
    holds = dict(zip(statements, mllm.score(image, statements) > 0.5, strict=True))
    violated = frozenset(
        rule.id for rule in compiled.rules if all(any(holds[alt.text] for alt in item) for item in rule.preconditions)
    )
    return Prediction(bool(violated), violated, mllm.calls, 0)


def _clue(options: JudgeOptions) -> Method:
    def run(frames: Sequence[Image.Image], compiled: CompiledConstitution, models: Models) -> Prediction:
        return Prediction.of_verdict(judge_frames(frames, compiled, models, options))

    return run


METHOD_NAMES = {
    "prior-knowledge": f"prior knowledge + Yes/No (\"{PRIOR_KNOWLEDGE_QUESTION}\")",
    "whole-constitution": "whole constitution in one question + Yes/No",
    "rule-question": "one question per rule (no preconditions)",
    "clue-no-debias": "CLUE without debiasing (M > 0.5)",
    "clue-no-strategy2": "CLUE without Strategy 2",
    "clue": "CLUE (full)",
    "clue-calibrated": "CLUE, calibrated thresholds",
    "clue-served": "CLUE (full), served",
}


def methods(calibration: Calibration | None = None) -> dict[str, Method]:
    table: dict[str, Method] = {
        "prior-knowledge": _one_question(lambda compiled: PRIOR_KNOWLEDGE_QUESTION),
        "whole-constitution": _one_question(_whole_constitution),
        "rule-question": _per_frame(_rule_questions),
        "clue-no-debias": _per_frame(_chain_no_debias),
        "clue-no-strategy2": _clue(JudgeOptions(strategy2=False)),
        "clue": _clue(JudgeOptions()),
    }
    if calibration is not None:
        table["clue-calibrated"] = _clue(JudgeOptions(thresholds=calibration.thresholds))
    return table


@dataclass(frozen=True)
class MethodRun:
    """One method's predictions on every image of a bench, in bench order, and the seconds they took."""

    predictions: list[Prediction]
    seconds: float


def run_methods(
    bench: Sequence[BenchItem], chosen: dict[str, Method], compiled: CompiledConstitution, models: Models
) -> dict[str, MethodRun]:
    """Every method on every image, in process; each image is read once and judged by all methods in turn."""
    predictions: dict[str, list[Prediction]] = {name: [] for name in chosen}
    seconds = dict.fromkeys(chosen, 0.0)
    for item in bench:
        frames = item.frames()
        for name, method in chosen.items():
            started = time.perf_counter()
            predictions[name].append(method(frames, compiled, models))
            seconds[name] += time.perf_counter() - started
    return {name: MethodRun(predictions[name], seconds[name]) for name in chosen}


def run_served(
    bench: Sequence[BenchItem], client: JudgeClient, constitution: str, concurrency: int
) -> tuple[MethodRun, str]:
    """Full CLUE as a running server judges it (its own models, thresholds and limits), `concurrency`
    requests in flight; and the model id the server reports. An image the server refuses is a BenchError
    naming its label's line; any other failure of the server raises its safejudge_client error."""

    def judge(item: BenchItem) -> Verdict:
        try:
            return client.judge(item.request_image(), constitution)
        except InvalidRequest as exc:
            raise BenchError(f"{item.where}: the server refused it: {exc}") from exc

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        verdicts = list(pool.map(judge, bench))
    run = MethodRun([Prediction.of_verdict(v) for v in verdicts], time.perf_counter() - started)
    return run, verdicts[0].model_id if verdicts else ""


# ---------------------------------------------------------------- metrics and reports


class Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: float
    recall: float
    accuracy: float
    f1: float
    positives: int
    images: int

    @classmethod
    def of(cls, truth: Sequence[bool], predicted: Sequence[bool]) -> Metrics:
        t, p = np.asarray(truth, bool), np.asarray(predicted, bool)
        tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return cls(precision=precision, recall=recall, accuracy=float((t == p).mean()) if len(t) else 0.0, f1=f1,
                   positives=int(t.sum()), images=len(t))


class MethodReport(Metrics):
    """A method's image-level metrics (Metrics' fields), its per-rule metrics and its costs."""

    method: str
    description: str
    per_rule: dict[str, Metrics] = Field(default_factory=dict, description="empty when the method names no rules")
    benign_false_positive_rate: float | None = Field(
        description="share of the benign images judged unsafe; None: there are no benign images"
    )
    mllm_calls_per_image: float
    reasoning_calls_per_image: float
    ms_per_image: float = Field(description="in process: the method's own time; served: wall time / images")

    @classmethod
    def measured(cls, name: str, bench: Sequence[BenchItem], run: MethodRun, rule_ids: Sequence[str]) -> MethodReport:
        predictions = run.predictions
        per_rule = {}
        if all(p.violated is not None for p in predictions):
            per_rule = {
                rid: Metrics.of([rid in item.violated for item in bench], [rid in p.violated for p in predictions])
                for rid in rule_ids
            }
        benign = [p.unsafe for item, p in zip(bench, predictions, strict=True) if item.split == "benign"]
        return cls(
            method=name,
            description=METHOD_NAMES[name],
            **Metrics.of([item.unsafe for item in bench], [p.unsafe for p in predictions]).model_dump(),
            per_rule=per_rule,
            benign_false_positive_rate=float(np.mean(benign)) if benign else None,
            mllm_calls_per_image=float(np.mean([p.mllm_calls for p in predictions])) if predictions else 0.0,
            reasoning_calls_per_image=float(np.mean([p.reasoning_calls for p in predictions])) if predictions else 0.0,
            ms_per_image=1000.0 * run.seconds / max(1, len(bench)),
        )


class EvalReport(BaseModel):
    """What `safejudge eval` prints, and writes with --json."""

    model_config = ConfigDict(extra="forbid")

    constitution: str
    model_id: str
    bench: str = Field(description="what was judged: the generated toy bench, or a labels file and its folder")
    images: int
    unsafe_images: int
    methods: list[MethodReport]
    notes: list[str] = Field(default_factory=list)

    @classmethod
    def measured(
        cls, constitution: Constitution, model_id: str, bench: Sequence[BenchItem], bench_name: str,
        runs: dict[str, MethodRun], notes: Sequence[str] = (),
    ) -> EvalReport:
        rule_ids = [rule.id for rule in constitution.enabled_rules]
        return cls(
            constitution=constitution.name,
            model_id=model_id,
            bench=bench_name,
            images=len(bench),
            unsafe_images=sum(item.unsafe for item in bench),
            methods=[MethodReport.measured(name, bench, run, rule_ids) for name, run in runs.items()],
            notes=list(notes),
        )


def evaluate(
    constitution: Constitution, models: Models, bench: Sequence[BenchItem], chosen: dict[str, Method], bench_name: str
) -> EvalReport:
    """Every chosen method on the bench, in process (Table-2-style report)."""
    runs = run_methods(bench, chosen, compile_constitution(constitution, models), models)
    return EvalReport.measured(constitution, models.mllm.model_id, bench, bench_name, runs)


# ---------------------------------------------------------------- calibration


class CalibrationPoint(BaseModel):
    thresholds: dict[str, float]
    precision: float
    recall: float
    f1: float
    reasoning_calls_per_image: float


CALIBRATION_GRID = {
    "alpha1_factor": (-0.1, -0.2, -0.3, -0.5, -0.7),
    "alpha2_factor": (0.4, 0.6, 0.8, 0.9),
    "beta": (0.4, 0.6),
}


def calibrate(
    constitution: Constitution, models: Models, bench: Sequence[BenchItem], dev_split: str, seed: int | None = None,
    grid: dict[str, Sequence[float]] = CALIBRATION_GRID,
) -> tuple[Calibration, list[CalibrationPoint]]:
    """Grid search over the CLUE thresholds for the best image-level F1 on the dev split (named dev_split;
    seed: the generated bench's); ties go to fewer reasoning calls. Returns the fit and every grid point
    (for a precision-recall plot)."""
    settings = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    chosen = {f"grid-{i}": _clue(JudgeOptions(thresholds=t)) for i, t in enumerate(settings)}
    chosen["default"] = _clue(JudgeOptions())
    runs = run_methods(bench, chosen, compile_constitution(constitution, models), models)
    truth = [item.unsafe for item in bench]
    points = []
    for index, thresholds in enumerate(settings):
        predictions = runs[f"grid-{index}"].predictions
        metrics = Metrics.of(truth, [p.unsafe for p in predictions])
        points.append(CalibrationPoint(thresholds=thresholds, precision=metrics.precision, recall=metrics.recall,
                                       f1=metrics.f1, reasoning_calls_per_image=float(np.mean([p.reasoning_calls for p in predictions]))))
    best = max(points, key=lambda p: (round(p.f1, 6), -p.reasoning_calls_per_image))
    default = Metrics.of(truth, [p.unsafe for p in runs["default"].predictions])
    calibration = Calibration(
        model_id=models.mllm.model_id,
        constitution=constitution.name,
        constitution_hash=constitution.content_hash(),
        thresholds=best.thresholds,
        dev_split=dev_split,
        dev_seed=seed,
        dev_images=len(bench),
        dev_f1=best.f1,
        dev_reasoning_calls_per_image=best.reasoning_calls_per_image,
        default_f1=default.f1,
    )
    return calibration, points


def plot_precision_recall(points: Sequence[CalibrationPoint], chosen: Calibration, path: Path) -> None:
    """Precision against recall of every grid point, the chosen one marked (needs matplotlib: the `eval` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the precision-recall plot needs matplotlib: pip install 'safejudge[eval]'") from exc
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.scatter([p.recall for p in points], [p.precision for p in points], s=12, label="threshold grid")
    best = next(p for p in points if p.thresholds == chosen.thresholds)
    axes.scatter([best.recall], [best.precision], s=60, marker="*", color="red", label=f"chosen (F1 {best.f1:.3f})")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(f"{chosen.constitution} / {chosen.model_id} (dev: {chosen.dev_images} images)")
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------- rendering and the demo


def report_tables(report: EvalReport) -> list:
    """Rich tables: Table-2-style overall metrics per method, then F1 per rule."""
    from rich.table import Table

    overall = Table(title=f"{report.constitution} / {report.model_id}: {report.images} images "
                          f"({report.unsafe_images} unsafe), {report.bench}")
    for column in ("method", "precision", "recall", "accuracy", "F1", "benign FP", "MLLM calls/img",
                   "reasoning/img", "ms/img"):
        overall.add_column(column, justify="left" if column == "method" else "right")
    for m in report.methods:
        overall.add_row(m.description, f"{m.precision:.3f}", f"{m.recall:.3f}", f"{m.accuracy:.3f}", f"{m.f1:.3f}",
                        "-" if m.benign_false_positive_rate is None else f"{m.benign_false_positive_rate:.3f}",
                        f"{m.mllm_calls_per_image:.2f}",
                        f"{m.reasoning_calls_per_image:.2f}", f"{m.ms_per_image:.1f}")
    per_rule = Table(title="F1 per rule (precision/recall)")
    per_rule.add_column("method")
    rule_ids = next((list(m.per_rule) for m in report.methods if m.per_rule), [])
    for rule_id in rule_ids:
        per_rule.add_column(rule_id, justify="right")
    for m in report.methods:
        if m.per_rule:
            per_rule.add_row(m.description, *(f"{r.f1:.3f} ({r.precision:.2f}/{r.recall:.2f})" for r in m.per_rule.values()))
    return [overall, per_rule]


def demo_scenes(constitution: Constitution, scenes: int, seed: int) -> list:
    """`scenes` generated bench items: a mix of rule violations, hard negatives and benign scenes."""
    per_rule = max(1, -(-scenes // (2 * len(constitution.enabled_rules) + 1)))
    bench = make_bench(constitution, per_rule=per_rule, benign=per_rule, seed=seed)
    return [bench[int(i)] for i in np.random.default_rng(seed).permutation(len(bench))[:scenes]]


def demo_table(items: Sequence, verdicts: Sequence[Verdict], title: str):
    """A rich table of scenes, their truth and their verdicts; and how many verdicts were exactly right."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("scene (ground truth)", "truly violated", "verdict", "violated rules", "reason"):
        table.add_column(column)
    correct = 0
    for item, verdict in zip(items, verdicts, strict=True):
        correct += set(verdict.violated_rule_ids) == set(item.violated)
        reason = "; ".join(f"{v.rule_id}: {v.reason}" for v in verdict.violations) or "no rule violated"
        table.add_row(item.scene.describe(), ", ".join(sorted(item.violated)) or "-",
                      "SAFE" if verdict.safe else "UNSAFE", ", ".join(verdict.violated_rule_ids) or "-", reason)
    return table, correct, len(items)
