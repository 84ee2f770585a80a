"""`safejudge bench`: the paper's sequential loop, the engine in process and the engine served through
Triton, side by side on the same model and images, with verdict agreement enforced.

Random weights cost what real ones cost but decide nothing useful: left alone, every precondition of every
rule holds on every image (fail-closed), the loop never stops early and every verdict is the same. So the
loop-vs-engine comparison runs in *regimes*: a `PlannedMLLM` runs every real scoring forward (real cost)
and then replaces each image-conditioned score by one that makes the precondition fail (alpha1) or hold
(alpha2) as a plan seeded per image says, so that the loop stops early as it would on real data (`best`,
`mixed`) or never does (`worst`). Both evaluators see the same plan for the same image.

Prints and appends to benchmarks/RESULTS.md: per regime images/s of loop and engine and their ratio,
latency percentiles, MLLM forward passes and tokens per image against the loop's needed minimum; the
served path against the engine in process (real outcomes); cost growth with rule count and image size;
PNG plots. A disagreement, a regime whose verdicts are all the same, or a plan the verdicts do not follow
fails the run.
"""

from __future__ import annotations

import gc
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from safejudge.backends.base import Models, MLLMStats
from safejudge.backends.registry import ModelSpec, load_models
from safejudge.compiled import CompiledConstitution, all_statements, compile_constitution
from safejudge.constitution import Constitution, Rule, Thresholds, load_constitution
from safejudge.evaluators import JudgeOptions, judge_batched, judge_sequential
from safejudge.shipped import CONSTITUTIONS
from safejudge_client.verdict import Verdict


class BenchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: ModelSpec = Field(default_factory=lambda: ModelSpec(relevance=None))
    constitution: Path = CONSTITUTIONS / "os-bench.yaml"
    constitution_rules: int | None = Field(None, ge=1, description="judge only the first N rules (cycled if more)")
    images: int = Field(6, ge=1, description="distinct images for the engine and the server")
    sequential_images: int = Field(2, ge=1, description="images for the (slow) sequential reference")
    image_size: int = Field(448, ge=16)
    concurrency: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    requests_per_level: int = Field(32, ge=1)
    rule_counts: list[int] = Field(default_factory=lambda: [5, 14, 30, 60])
    image_sizes: list[int] = Field(default_factory=lambda: [224, 448, 896])
    scaling_images: int = Field(2, ge=1, description="images per point of the growth curves")
    # Random weights make relevance meaningless and every answer inconclusive: judge every rule and
    # measure the scoring path; reasoning (identical generation work in both evaluators) is left out.
    options: JudgeOptions = Field(
        default_factory=lambda: JudgeOptions(relevance_filter=False, max_reasoning_calls=0)
    )
    served: bool = True
    judge_instances: int | None = Field(None, ge=1, description="safety_judge processes on the server; None: serve's default")
    regimes: list[str] = Field(default_factory=lambda: list(REGIMES), description="outcome plans, see REGIMES")
    seed: int = Field(0, description="seed of the outcome plans (one stream per regime and image)")
    schedules: list[str] = Field(
        default_factory=list,
        description="engine schedules to run in each regime (JudgeOptions.schedule); empty: the default only",
    )
    results: Path = Path("benchmarks/RESULTS.md")
    plots: Path = Path("benchmarks")
    json_out: Path | None = None

    @field_validator("regimes")
    @classmethod
    def _known_regimes(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in REGIMES]
        if unknown or not names:
            raise ValueError(f"regimes must be some of {', '.join(REGIMES)}, not {names!r}")
        return names

    @field_validator("schedules")
    @classmethod
    def _known_schedules(cls, schedules: list[str]) -> list[str]:
        for schedule in schedules:
            JudgeOptions(schedule=schedule)  # an unknown value is refused here, with JudgeOptions' message
        return schedules


class BenchInvalid(RuntimeError):
    """The benchmark's numbers would mean nothing: the run fails instead of reporting them."""


class VerdictMismatch(BenchInvalid):
    """Two paths judged the same image differently."""


class DegenerateRegime(BenchInvalid):
    """A regime judged every image the same way: agreement between the paths would prove nothing."""


class PlanError(BenchInvalid):
    """The planned outcomes were not what the evaluators did (or cannot be expressed as scores)."""


# -- outcome plans ---------------------------------------------------------------------------------------

MIXED_SHARES = {"fail at item 1": 0.4, "fail at item 2": 0.3, "fail later": 0.1, "violated": 0.2}

REGIMES: dict[str, str] = {
    "worst": "the loop's worst case: nothing stops it early, it asks every alternative of every item of every "
    "rule. Unsafe images: every rule is violated (every item holds, at its last alternative); safe images: every "
    "rule fails at its last item (all its alternatives fail, the earlier items hold at their last alternative). "
    "(The bench before regimes was close to this: fail-closed made every rule hold on every image, each item at "
    "its first alternative.)",
    "best": "the loop's best case: safe images: every rule fails at its first item; unsafe images: one rule "
    "(seeded) is violated, its items holding at their first alternative, every other rule fails at its first "
    "item that can fail (an item whose statement another rule needs to hold moves it to the next).",
    "mixed": "unsafe images: each rule fails at item 1 / item 2 / a later item / is violated with probability "
    "0.4 / 0.3 / 0.1 / 0.2 (at least one violated); safe images: the same first three in proportion "
    "(0.5 / 0.375 / 0.125). An item past a rule's last is its last; a held item holds at a seeded alternative.",
}


def planned_score(holds: bool, prior: float, thresholds: Thresholds) -> float:
    """A score that passes the alpha2 test (holds) or fails the alpha1 test, given the prior M0, halfway
    between the threshold and the end of the scale, so that priors recomputed by the loop (one question at a
    time, not packed) land on the same side."""
    if holds:
        if not (thresholds.alpha2_factor < 1.0 and prior < 1.0):
            raise PlanError(f"no score holds at alpha2 with prior {prior} and factor {thresholds.alpha2_factor}")
        return prior + (1.0 + thresholds.alpha2_factor) / 2.0 * (1.0 - prior)
    if not (thresholds.alpha1_factor > -1.0 and prior > 0.0):
        raise PlanError(f"no score fails at alpha1 with prior {prior} and factor {thresholds.alpha1_factor}")
    return prior * (1.0 + thresholds.alpha1_factor) / 2.0


@dataclass
class ImagePlan:
    """One image's planned outcome of every statement (True: holds), and what Algorithm 1 does with it."""

    holds: dict[str, bool]
    unsafe_target: bool
    questions: list[str] = field(default_factory=list)  # the loop's image-conditioned questions, in order
    fates: dict[str, int | None] = field(default_factory=dict)  # rule id -> failing item (0-based); None: violated

    def walk(self, rules: Sequence[Rule]) -> ImagePlan:
        """Fill questions and fates by running Algorithm 1's control flow over the planned outcomes."""
        self.questions, self.fates = [], {}
        for rule in rules:
            fate = None
            for index, item in enumerate(rule.preconditions):
                held = False
                for alt in item:
                    self.questions.append(alt.text)
                    if self.holds[alt.text]:
                        held = True
                        break
                if not held:
                    fate = index
                    break
            self.fates[rule.id] = fate
        return self

    @property
    def violated(self) -> tuple[str, ...]:
        return tuple(sorted(rule_id for rule_id, fate in self.fates.items() if fate is None))


def _targets(regime: str, rules: Sequence[Rule], unsafe: bool, rng: np.random.Generator) -> list[tuple[int | None, str]]:
    """Per rule: the item it is to fail at (None: violated) and which alternative holds in its held items."""
    if regime == "worst":
        return [(None if unsafe else len(rule.preconditions) - 1, "last") for rule in rules]
    if regime == "best":
        chosen = int(rng.integers(len(rules))) if unsafe else -1
        return [(None if index == chosen else 0, "first") for index in range(len(rules))]
    kinds = list(MIXED_SHARES)
    shares = np.array(list(MIXED_SHARES.values()))
    if not unsafe:
        kinds, shares = kinds[:-1], shares[:-1] / shares[:-1].sum()
    drawn = [kinds[int(rng.choice(len(kinds), p=shares))] for _ in rules]
    if unsafe and "violated" not in drawn:
        drawn[int(rng.integers(len(rules)))] = "violated"
    targets = []
    for rule, kind in zip(rules, drawn, strict=True):
        last = len(rule.preconditions) - 1
        item = {"fail at item 1": 0, "fail at item 2": 1, "violated": None}.get(kind, -1)
        if item == -1:  # later: uniform over items 3.., the last one if there are fewer
            item = int(rng.integers(2, last + 1)) if last >= 2 else last
        targets.append((None if item is None else min(item, last), "random"))
    return targets


def make_plan(regime: str, rules: Sequence[Rule], unsafe: bool, rng: np.random.Generator) -> ImagePlan:
    """Statement outcomes realising the regime's rule targets as far as shared statements allow (a statement
    one rule needs to hold holds for every rule), then the walk that tells what Algorithm 1 will do."""
    holds: dict[str, bool] = {}

    def hold_item(item, choice: str) -> bool:
        texts = [alt.text for alt in item]
        if any(holds.get(text) for text in texts):
            return True
        preferred = {"first": 0, "last": len(texts) - 1}.get(choice)
        preferred = int(rng.integers(len(texts))) if preferred is None else preferred
        free = [index for index in [preferred, *range(len(texts))] if texts[index] not in holds]
        if not free:
            return False  # every alternative already fails for another rule
        holds[texts[free[0]]] = True
        for text in texts[: free[0]]:
            holds.setdefault(text, False)
        return True

    def fail_item(item) -> bool:
        texts = [alt.text for alt in item]
        if any(holds.get(text) for text in texts):
            return False
        for text in texts:
            holds.setdefault(text, False)
        return True

    targets = list(zip(rules, _targets(regime, rules, unsafe, rng), strict=True))
    # Violated rules claim their statements first: a rule failing at item 1 must not fail a statement that a
    # violated rule shares (e.g. "A person is visible").
    for rule, (fail_at, choice) in sorted(targets, key=lambda target: target[1][0] is not None):
        for index, item in enumerate(rule.preconditions):
            if fail_at is not None and index >= fail_at:
                if fail_item(item):
                    break
            elif not hold_item(item, choice):
                break
    for text in all_statements(list(rules)):  # asked by the engine only: they decide nothing
        holds.setdefault(text, bool(rng.integers(2)))
    return ImagePlan(holds, unsafe).walk(rules)


def regime_plans(regime: str, rules: Sequence[Rule], count: int, seed: int) -> list[ImagePlan]:
    """One plan per image, seeded per (seed, regime, image); even-numbered images are meant unsafe, odd safe,
    so that any two consecutive images cover both verdicts."""
    stream = list(REGIMES).index(regime)
    return [make_plan(regime, rules, index % 2 == 0, np.random.default_rng([seed, stream, index]))
            for index in range(count)]


class PlannedMLLM:
    """The MLLM protocol around a real backend: every call runs for real (real cost); the image-conditioned
    scores it returns are replaced by the planned ones of the image (registered with `plan`). Priors
    (image None) and reasoning pass through. Records every question asked with each image."""

    def __init__(self, mllm, priors: dict[str, float], thresholds: Thresholds):
        self.mllm = mllm
        self.model_id = mllm.model_id
        self.fingerprint = mllm.fingerprint
        # The engine's default schedule is the backend's preference: keep it visible through the wrapper.
        self.preferred_schedule = getattr(mllm, "preferred_schedule", None)
        self.priors = priors
        self.thresholds = thresholds
        self._plans: dict[int, tuple[Image.Image, ImagePlan]] = {}  # by id(): hashing pixels per call costs
        self.asked: dict[int, list[str]] = {}

    @property
    def stats(self) -> MLLMStats:
        return self.mllm.stats

    def plan(self, image: Image.Image, plan: ImagePlan) -> None:
        self._plans[id(image)] = (image, plan)
        self.asked[id(image)] = []

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        real = np.asarray(self.mllm.score(image, questions), dtype=np.float64)
        if image is None:
            return real
        entry = self._plans.get(id(image))
        if entry is None or entry[0] is not image:
            raise PlanError("an image without a plan was scored (a Strategy 2 view?): planned regimes score "
                            "only the judged images")
        self.asked[id(image)].extend(questions)
        plan = entry[1]
        return np.array([planned_score(plan.holds[q], self.priors[q], self.thresholds) for q in questions])

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        return self.mllm.reason(image, questions)

    def minimum_tokens(self, image: Image.Image | None, questions: Sequence[str]) -> int:
        return self.mllm.minimum_tokens(image, questions)

    def forget_images(self) -> None:
        if hasattr(self.mllm, "forget_images"):
            self.mllm.forget_images()


@dataclass
class Run:
    """Latencies and per-image work of one path over a set of images."""

    name: str
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    verdicts: list[Verdict] = field(default_factory=list)
    work: list[MLLMStats] = field(default_factory=list)
    minimum_tokens: list[int] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # served runs: which image each verdict is for
    asked: list[list[str]] = field(default_factory=list)  # planned runs: questions asked with each image

    def judge(self, judge: Callable[..., Verdict], image: Image.Image, compiled: CompiledConstitution,
              models: Models, options: JudgeOptions) -> None:
        """Judge one image, timed; record its verdict, the MLLM's work and (planned) the questions asked."""
        mllm = models.mllm
        before = mllm.stats.copy() if hasattr(mllm, "stats") else None
        # Every judgement starts cold, as a new image does on a server: without this the engine would reuse
        # the image prefix the loop just prefilled for the same image (or the other way round).
        if hasattr(mllm, "forget_images"):
            mllm.forget_images()
        t = time.perf_counter()
        verdict = judge(image, compiled, models, options)
        latency = time.perf_counter() - t
        self.latencies_s.append(latency)
        self.wall_s += latency  # judging only: bookkeeping is not the evaluator's cost
        self.verdicts.append(verdict)
        if before is not None:
            self.work.append(mllm.stats - before)
        if isinstance(mllm, PlannedMLLM):
            self.asked.append(list(mllm.asked[id(image)]))

    @property
    def images_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000.0

    def mean(self, values: Sequence[float]) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    @property
    def forward_passes(self) -> float:
        return self.mean([w.forward_passes for w in self.work])

    @property
    def token_ratio(self) -> float:
        """Tokens processed against the minimum for what this run itself asked."""
        return self.tokens_against(self.minimum_tokens)

    @property
    def reasoning_calls(self) -> float:
        return self.mean([v.reasoning_calls for v in self.verdicts])

    @property
    def tokens(self) -> float:
        return self.mean([w.tokens_processed for w in self.work])

    def tokens_against(self, minima: Sequence[int]) -> float:
        """Tokens processed on the first len(minima) images, each against its own minimum, averaged."""
        return self.mean([w.tokens_processed / m for w, m in zip(self.work, minima) if m])


def bench_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Photo-like test images: smooth colour fields with texture, distinct per index."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    images = []
    for _ in range(count):
        colours = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        field_ = axis[None, :, None] * colours[0] + axis[:, None, None] * colours[1] + colours[2] * 0.3
        texture = rng.normal(0.0, 18.0, (size, size, 3)).astype(np.float32)
        images.append(Image.fromarray(np.clip(field_ * 0.7 + texture, 0, 255).astype(np.uint8), "RGB"))
    return images


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scaled_constitution(base: Constitution, rules: int) -> Constitution:
    """A constitution with `rules` rules: the base's rules, cycled, each copy asking about a different
    region so that no question is shared (shared questions would be scored once and hide the cost)."""
    regions = ["", " in the foreground", " in the background", " on the left", " on the right"]
    made = []
    for index in range(rules):
        rule = base.rules[index % len(base.rules)]
        region = regions[(index // len(base.rules)) % len(regions)]
        copy = rule.model_copy(deep=True)
        copy.id = f"{rule.id}-{index}" if index >= len(base.rules) else rule.id
        for item in copy.preconditions:
            for alternative in item:
                alternative.text = alternative.text + region
        made.append(copy)
    return base.model_copy(update={"name": f"{base.name}-{rules}", "rules": made})


def _statements_judged(verdict: Verdict, compiled: CompiledConstitution) -> list[str]:
    considered = set(verdict.rules_considered)
    return all_statements([rule for rule in compiled.rules if rule.id in considered])


def run_in_process(
    name: str,
    judge: Callable[..., Verdict],
    images: Sequence[Image.Image],
    compiled: CompiledConstitution,
    models: Models,
    options: JudgeOptions,
) -> Run:
    run = Run(name)
    for image in images:
        run.judge(judge, image, compiled, models, options)
    if hasattr(models.mllm, "stats") and hasattr(models.mllm, "minimum_tokens"):
        run.minimum_tokens = [models.mllm.minimum_tokens(image, _statements_judged(verdict, compiled))
                              for image, verdict in zip(images, run.verdicts, strict=True)]
    return run


WARM_UP_WIDTH = 4  # concurrent warm-up requests before each served level (reaches every instance)


def run_served(url: str, images: Sequence[bytes], constitution: str, options: JudgeOptions, concurrency: int,
               requests: int) -> Run:
    from safejudge_client import JudgeClient

    run = Run(f"served c={concurrency}")
    clients = [JudgeClient(url, timeout_s=600, retries=0) for _ in range(concurrency)]
    payload = options.model_dump(exclude_defaults=True)
    order = [index % len(images) for index in range(requests)]

    def one(slot: int, index: int) -> tuple[int, float, Verdict]:
        t = time.perf_counter()
        verdict = clients[slot % concurrency].judge(images[index], constitution, payload)
        return index, time.perf_counter() - t, verdict

    try:
        # Warm-up at this level and at least 4 wide, so that every instance has compiled the constitution
        # and paid its first-call costs before anything is timed.
        warm = max(concurrency, WARM_UP_WIDTH)
        with ThreadPoolExecutor(warm) as pool:
            list(pool.map(lambda index: clients[0].judge(images[index % len(images)], constitution, payload),
                          range(2 * warm)))
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests), order))
        run.wall_s = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    for index, latency, verdict in results:
        run.latencies_s.append(latency)
        run.verdicts.append(verdict)
    run.order = [index for index, _, _ in results]
    return run


def check_agreement(reference: Run, other: Run, order: Sequence[int] | None = None) -> None:
    order = list(order) if order is not None else list(range(len(other.verdicts)))
    for verdict, index in zip(other.verdicts, order, strict=True):
        if index >= len(reference.verdicts):
            continue
        expected = reference.verdicts[index]
        if verdict.decision() != expected.decision():
            raise VerdictMismatch(
                f"{other.name} disagrees with {reference.name} on image {index}: "
                f"{verdict.decision()} != {expected.decision()}"
            )


def check_both_verdicts(name: str, verdicts: Sequence[Verdict]) -> None:
    """A regime must judge some images safe and some unsafe, or agreement between the paths is vacuous."""
    kinds = {verdict.safe for verdict in verdicts}
    if len(verdicts) > 1 and len(kinds) < 2:
        raise DegenerateRegime(
            f"{name}: all {len(verdicts)} verdicts are {'safe' if kinds == {True} else 'unsafe'}; a regime must "
            "judge both safe and unsafe images"
        )


def check_plan(run: Run, plans: Sequence[ImagePlan]) -> None:
    """The verdicts are the plan's (every violated rule and no other); a loop asked exactly what Algorithm 1
    asks under the plan. Anything else means the wrapper's scores did not decide what they were meant to."""
    for index, (verdict, plan) in enumerate(zip(run.verdicts, plans)):
        if verdict.decision()[1] != plan.violated:
            raise PlanError(f"{run.name}, image {index}: violated {list(verdict.decision()[1])}, planned "
                            f"{list(plan.violated)}")
        if run.asked and verdict.evaluator == "sequential" and run.asked[index] != plan.questions:
            raise PlanError(f"{run.name}, image {index}: the loop asked {len(run.asked[index])} questions, the plan "
                            f"walks {len(plan.questions)}")


@dataclass
class RegimeResult:
    """The loop and the engine (one run per schedule) under one regime's plans, and what went wrong."""

    regime: str
    plans: list[ImagePlan]
    loop: Run
    engines: list[Run]
    loop_minimum: list[int]  # per loop image: its image prefix once + every question the loop asked with it
    problems: list[BenchInvalid] = field(default_factory=list)

    def label(self, engine: Run) -> str:
        return self.regime if len(self.engines) == 1 else f"{self.regime} ({engine.name})"

    def fates(self) -> dict[str, float]:
        """Realised shares of the rules' fates over (image, rule) pairs of every planned image."""
        outcomes = [fate for plan in self.plans for fate in plan.fates.values()]
        names = list(MIXED_SHARES)
        kinds = [names[3] if f is None else names[min(f, 2)] for f in outcomes]
        return {name: kinds.count(name) / len(kinds) for name in names}

    def summary(self, engine: Run) -> dict:
        return {
            "name": self.label(engine),
            "speedup": engine.images_per_s / self.loop.images_per_s,
            "tokens_vs_loop_minimum": engine.tokens_against(self.loop_minimum),
            "safe": sum(v.safe for v in engine.verdicts),
            "unsafe": sum(not v.safe for v in engine.verdicts),
            "agreement": not self.problems,
            "loop_images_per_s": self.loop.images_per_s,
            "engine_images_per_s": engine.images_per_s,
            "loop_p50_ms": self.loop.percentile(50), "loop_p95_ms": self.loop.percentile(95),
            "engine_p50_ms": engine.percentile(50), "engine_p95_ms": engine.percentile(95),
            "loop_forward_passes": self.loop.forward_passes, "engine_forward_passes": engine.forward_passes,
            "loop_tokens": self.loop.tokens, "engine_tokens": engine.tokens,
            "loop_minimum_tokens": float(np.mean(self.loop_minimum)) if self.loop_minimum else None,
            "loop_tokens_vs_loop_minimum": self.loop.tokens_against(self.loop_minimum),
            "fates": self.fates(),
            "problems": [str(problem) for problem in self.problems],
        }


def run_regime(
    regime: str,
    images: Sequence[Image.Image],
    loop_images: int,
    compiled: CompiledConstitution,
    models: Models,
    options: JudgeOptions,
    engine_options: dict[str, JudgeOptions],
    seed: int,
) -> RegimeResult:
    """The loop on the first loop_images images and the engine on all of them, the same plan per image.
    engine_options: one engine run per entry (name -> options), e.g. per schedule."""
    thresholds = options.thresholds_for(compiled.constitution.thresholds)
    planned = PlannedMLLM(models.mllm, compiled.priors, thresholds)
    planned_models = Models(planned, models.relevance, models.detector)
    plans = regime_plans(regime, compiled.rules, len(images), seed)

    loop, engines = Run("paper's loop"), [Run(name) for name in engine_options]
    # Interleaved image by image, so that both paths see the same load on a shared machine.
    for index, (image, plan) in enumerate(zip(images, plans, strict=True)):
        if index < loop_images:
            planned.plan(image, plan)
            loop.judge(judge_sequential, image, compiled, planned_models, options)
        for engine, opts in zip(engines, engine_options.values(), strict=True):
            planned.plan(image, plan)
            engine.judge(judge_batched, image, compiled, planned_models, opts)
    minimum = [planned.minimum_tokens(image, list(dict.fromkeys(asked)))
               for image, asked in zip(images, loop.asked)] if hasattr(planned.mllm, "minimum_tokens") else []
    result = RegimeResult(regime, plans, loop, engines, minimum)
    checks = [lambda: check_plan(loop, plans), lambda: check_both_verdicts(f"regime {regime}, {loop.name}", loop.verdicts)]
    for engine in engines:
        checks += [
            lambda engine=engine: check_plan(engine, plans),
            lambda engine=engine: check_both_verdicts(f"regime {regime}, {engine.name}", engine.verdicts),
            lambda engine=engine: check_agreement(engine, loop),
        ]
    for check in checks:
        try:
            check()
        except BenchInvalid as problem:
            result.problems.append(problem)
    return result


def engine_variants(options: JudgeOptions, schedules: Sequence[str]) -> dict[str, JudgeOptions]:
    """The engine runs of each regime: the options as given, or one per schedule."""
    if not schedules:
        return {"engine": options}
    return {f"engine, schedule={s}": JudgeOptions.model_validate({**options.model_dump(), "schedule": s})
            for s in schedules}


def machine_facts(settings: BenchSettings) -> str:
    import torch

    cpu = "unknown CPU"
    try:
        cpu_lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in cpu_lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), MLLM `{settings.models.mllm}` in {settings.models.dtype}"
    )


def _row(run: Run) -> str:
    work = f"{run.forward_passes:.1f} | {run.token_ratio:.2f}×" if run.work else "— | —"
    return (
        f"| {run.name} | {len(run.latencies_s)} | {run.images_per_s:.3f} | {run.percentile(50):.0f} | "
        f"{run.percentile(95):.0f} | {run.percentile(99):.0f} | {work} | {run.reasoning_calls:.1f} |"
    )


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


def plot(path: Path, xs, series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for label, ys in series.items():
        axes.plot(xs, ys, marker="o", label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> str:
    """Run everything, check agreement, return the Markdown report (also appended to settings.results).

    Raises BenchInvalid (after writing settings.json_out, with the problems) if a regime's paths disagree,
    judged every image alike or did not follow the plan; the report is then not appended."""
    command = "safejudge bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "run_bench(...)"
    base = load_constitution(settings.constitution)
    if settings.constitution_rules:
        base = scaled_constitution(base, settings.constitution_rules)
    log(f"loading {settings.models.mllm} ...")
    models = load_models(settings.models)
    compiled = compile_constitution(base, models)
    options = settings.options
    images = bench_images(settings.images, settings.image_size)

    log("engine in process, real outcomes (the served path's reference) ...")
    judge_batched(images[0], compiled, models, options)  # warm-up
    batched = run_in_process("engine in process (real outcomes)", judge_batched, images, compiled, models, options)

    # The plans assume every rule is judged: no relevance filter in the regimes.
    planned_options = options.model_copy(update={"relevance_filter": False})
    regimes = []
    for regime in settings.regimes:
        log(f"regime {regime}: the paper's loop on {min(settings.sequential_images, len(images))} image(s), "
            f"the engine on {len(images)} ...")
        regimes.append(run_regime(regime, images, settings.sequential_images, compiled, models, planned_options,
                                  engine_variants(planned_options, settings.schedules), settings.seed))
    problems = [problem for result in regimes for problem in result.problems]
    if problems:
        _write_json(settings, regimes, None)
        kind = type(problems[0]) if len({type(p) for p in problems}) == 1 else BenchInvalid
        raise kind("; ".join(str(problem) for problem in problems))

    log("cost growth with rule count ...")
    rule_points = []
    for count in settings.rule_counts:
        scaled = compile_constitution(scaled_constitution(base, count), models)
        run = run_in_process(f"{count} rules", judge_batched, images[: settings.scaling_images], scaled, models, options)
        rule_points.append((count, len(all_statements(scaled.rules)), run))
    log("cost growth with image size ...")
    size_points = []
    for size in settings.image_sizes:
        sized = bench_images(settings.scaling_images, size, seed=1)
        size_points.append((size, run_in_process(f"{size}px", judge_batched, sized, compiled, models, options)))

    served: list[Run] = []
    if settings.served:
        del models, compiled  # the server loads its own copy: do not hold two large models at once
        gc.collect()
        served = _served_runs(settings, base, images, log)
        for run in served:
            check_agreement(batched, run, run.order)

    _write_json(settings, regimes, served_overhead_ms(batched, served))
    report = _report(settings, command, base, batched, regimes, served, rule_points, size_points)
    _plots(settings, batched, served, rule_points)
    settings.results.parent.mkdir(parents=True, exist_ok=True)
    with settings.results.open("a", encoding="utf-8") as out:
        out.write(report)
    return report


def served_overhead_ms(batched: Run, served: Sequence[Run]) -> float | None:
    """Served p50 at the first concurrency level minus the engine's in-process p50."""
    return served[0].percentile(50) - batched.percentile(50) if served else None


def _write_json(settings: BenchSettings, regimes: Sequence[RegimeResult], served_overhead_ms: float | None) -> None:
    if settings.json_out is None:
        return
    document = {
        "regimes": [result.summary(engine) for result in regimes for engine in result.engines],
        "served_overhead_ms": served_overhead_ms,
        "served_concurrency": settings.concurrency[0] if settings.served else None,
        "mllm": settings.models.mllm,
        "options": settings.options.model_dump(mode="json", exclude_defaults=True),
    }
    settings.json_out.parent.mkdir(parents=True, exist_ok=True)
    settings.json_out.write_text(json.dumps(document, indent=1, default=float))


def _served_runs(settings: BenchSettings, base: Constitution, images: Sequence[Image.Image], log) -> list[Run]:
    from safejudge.pipeline import LENIENT_FLAG, RequestLimits, lenient_choices
    from safejudge.server import ServeSettings

    encoded = [png_bytes(image) for image in images]
    lenient = lenient_choices(settings.options, base.thresholds)
    if lenient:
        log(f"the bench's server runs with {LENIENT_FLAG}: its OPTIONS loosen the policy ({'; '.join(lenient)})")
    with tempfile.TemporaryDirectory(prefix="safejudge-bench-") as directory:
        Path(directory, f"{base.name}.yaml").write_text(yaml.safe_dump(base.model_dump(mode="json"), sort_keys=False))
        serve = ServeSettings(
            models=settings.models, constitutions=Path(directory), grpc_port=0, http_port=0, metrics_port=0,
            judge_instances=settings.judge_instances, limits=RequestLimits(allow_lenient_options=bool(lenient)),
        )
        log("starting the server ...")
        with serve.server() as server:
            runs = []
            for concurrency in settings.concurrency:
                log(f"served, concurrency {concurrency} ...")
                runs.append(run_served(server.url, encoded, base.name, settings.options, concurrency,
                                       max(settings.requests_per_level, concurrency)))
            return runs


SPEEDUP_GOALS = {"tiny": {"best": 5.0, "worst": 10.0}, "2b": {"best": 5.0, "worst": 20.0}}
TOKEN_GOAL = 1.15  # tokens per image against the loop's needed minimum, every regime
OVERHEAD_GOAL_MS = 5.0  # served p50 at concurrency 1 minus in-process p50
CONCURRENCY_GOAL = 2.0  # served images/s at concurrency 4 against 1, tiny model


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _regime_rows(regimes: Sequence[RegimeResult]) -> list[str]:
    header = ("| regime | images loop / engine | engine verdicts safe / unsafe | rule fates: fail at 1 / 2 / later / "
              "violated | path | images/s | p50 ms | p95 ms | MLLM passes/image | tokens/image | tokens vs loop's "
              "minimum | speedup |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for result in regimes:
        fates = " / ".join(f"{share:.0%}" for share in result.fates().values())
        engine0 = result.engines[0]
        lead = (f"| {result.regime} | {len(result.loop.verdicts)} / {len(engine0.verdicts)} | "
                f"{sum(v.safe for v in engine0.verdicts)} / {sum(not v.safe for v in engine0.verdicts)} | {fates} ")
        for run in [result.loop, *result.engines]:
            speedup = f"{run.images_per_s / result.loop.images_per_s:.1f}×"
            rows.append(
                f"{lead}| {run.name} | {run.images_per_s:.3f} | {run.percentile(50):.0f} | {run.percentile(95):.0f} | "
                f"{run.forward_passes:.1f} | {run.tokens:.0f} | {run.tokens_against(result.loop_minimum):.2f}× | "
                f"{speedup} |"
            )
            lead = "| | | | "
    return rows


def _goal_lines(settings: BenchSettings, regimes: Sequence[RegimeResult]) -> list[str]:
    size = "2b" if "2b" in settings.models.mllm else "tiny"
    lines = []
    for result in regimes:
        for engine in result.engines:
            summary = result.summary(engine)
            goal = SPEEDUP_GOALS[size].get(result.regime)
            speed = f"**{summary['speedup']:.1f}×** the loop's images/s"
            if goal is not None:
                speed += f" (goal ≥ {goal:.0f}× at this size: {_met(summary['speedup'] >= goal)})"
            tokens = summary["tokens_vs_loop_minimum"]
            lines.append(
                f"- {summary['name']}: {speed}; tokens per image **{tokens:.2f}×** the loop's needed minimum "
                f"(goal ≤ {TOKEN_GOAL}×: {_met(tokens <= TOKEN_GOAL)}; the loop itself "
                f"{summary['loop_tokens_vs_loop_minimum']:.2f}×)"
            )
    return lines


def _report(settings, command, base, batched: Run, regimes: Sequence[RegimeResult], served: list[Run], rule_points,
            size_points) -> str:
    header = "| path | images | images/s | p50 ms | p95 ms | p99 ms | MLLM passes/image | tokens vs minimum | reasoning calls/image |"
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {base.name} ({len(base.enabled_rules)} rules, "
        f"{len(all_statements(base.enabled_rules))} questions), {settings.image_size}px\n",
        f"Machine: {machine_facts(settings)}, load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the "
        "end. Random weights cost what real ones cost; these numbers say nothing about accuracy.\n",
        f"Command: `{command}`\n",
        f"Options: `{settings.options.model_dump_json(exclude_defaults=True)}`; plan seed {settings.seed}.\n",
        "### The paper's loop against the engine, by regime\n",
        "Every forward pass is real; the image-conditioned scores are then replaced by planned ones (fail at alpha1 "
        "or hold at alpha2 against the compiled prior), the same plan per image for both paths. Even-numbered images "
        "are planned unsafe, odd ones safe. The loop's needed minimum is one image prefix plus the tokens of the "
        "questions the loop asked with that image (measured on the loop's images). Regimes:\n",
        *(f"- `{name}`: {REGIMES[name]}" for name in settings.regimes),
        "",
        *_regime_rows(regimes),
        "",
        *_goal_lines(settings, regimes),
        "",
        "Verdicts of the loop and the engine agreed on every image of every regime and followed the plan; every "
        "regime judged both safe and unsafe images.\n",
        "### The engine in process (real outcomes) and served\n",
        "Random weights, fail-closed, no reasoning: every rule holds on every image here, so agreement is with one "
        "verdict only; the engine's cost does not depend on the outcomes (it asks every question). "
        + (f"Served verdicts agreed with in-process ones ({sum(len(r.verdicts) for r in served)} requests).\n"
           if served else "Not served in this run (--no-served).\n"),
        header,
        "|" + "---|" * (header.count("|") - 1),
        _row(batched),
        *(_row(run) for run in served),
        "",
        f"- tokens processed per image: engine **{batched.token_ratio:.2f}×** its own minimum (every question once "
        "after one image prefix)",
    ]
    if served:
        first, overhead = served[0], served_overhead_ms(batched, served)
        lines.append(
            f"- served p50 at concurrency {settings.concurrency[0]}: {first.percentile(50):.0f} ms vs in-process "
            f"{batched.percentile(50):.0f} ms (overhead {overhead:+.1f} ms; goal ≤ +{OVERHEAD_GOAL_MS:.0f} ms: "
            f"{_met(overhead <= OVERHEAD_GOAL_MS)})"
        )
        by_level = {int(r.name.split("=")[1]): r for r in served}
        if 1 in by_level and 4 in by_level:
            ratio = by_level[4].images_per_s / by_level[1].images_per_s
            lines.append(f"- served throughput at concurrency 4 vs 1: {ratio:.2f}× (goal ≥ {CONCURRENCY_GOAL:.0f}× "
                         f"with the tiny model: {_met(ratio >= CONCURRENCY_GOAL)})")
    if len(rule_points) > 1:
        slope, intercept = fit_slope([q for _, q, _ in rule_points], [r.mean(r.latencies_s) * 1000 for _, _, r in rule_points])
        growth = (f"Latency ≈ {intercept:.0f} ms + {slope:.1f} ms per question (least squares): the image prefix is "
                  "paid once, each added question costs only its own tokens.\n")
    else:
        growth = ""
    lines += [
        "",
        "Cost growth (engine in process, real outcomes):\n",
        "| rules | questions | images/s | p50 ms | tokens vs minimum |",
        "|---|---|---|---|---|",
        *(f"| {n} | {q} | {r.images_per_s:.3f} | {r.percentile(50):.0f} | {r.token_ratio:.2f}× |" for n, q, r in rule_points),
        "",
        growth,
        "| image size | images/s | p50 ms | MLLM passes/image |",
        "|---|---|---|---|",
        *(f"| {s}×{s} | {r.images_per_s:.3f} | {r.percentile(50):.0f} | {r.forward_passes:.1f} |" for s, r in size_points),
        "",
        "Plots: `latency_vs_concurrency.png`, `throughput_vs_rules.png`.\n",
    ]
    return "\n".join(lines)


def _plots(settings: BenchSettings, batched: Run, served: list[Run], rule_points) -> None:
    if served:
        levels = [int(r.name.split("=")[1]) for r in served]
        plot(settings.plots / "latency_vs_concurrency.png", levels,
             {"p50": [r.percentile(50) for r in served], "p95": [r.percentile(95) for r in served],
              "in process p50": [batched.percentile(50)] * len(levels)},
             "concurrent requests", "latency (ms)", "Served latency vs concurrency")
    plot(settings.plots / "throughput_vs_rules.png", [n for n, _, _ in rule_points],
         {"engine in process": [r.images_per_s for _, _, r in rule_points]},
         "rules in the constitution", "images/s", "Throughput vs constitution size")
