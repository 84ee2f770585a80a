"""`safejudge bench`: the paper's sequential loop, the engine in process and the engine served through
Triton, side by side on the same model and images, with verdict agreement enforced.

Prints and appends to benchmarks/RESULTS.md: images/s, latency percentiles, MLLM forward passes, tokens
processed against the minimum, reasoning calls, the ratios between the three, and cost growth with rule
count and image size; draws PNG plots. Any verdict disagreement fails the run.
"""

from __future__ import annotations

import gc
import io
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
from pydantic import BaseModel, ConfigDict, Field

from safejudge.backends.base import Models, MLLMStats
from safejudge.backends.registry import ModelSpec, load_models
from safejudge.compiled import CompiledConstitution, all_statements, compile_constitution
from safejudge.constitution import Constitution, load_constitution
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
    requests_per_level: int = Field(8, ge=1)
    rule_counts: list[int] = Field(default_factory=lambda: [5, 14, 30, 60])
    image_sizes: list[int] = Field(default_factory=lambda: [224, 448, 896])
    scaling_images: int = Field(2, ge=1, description="images per point of the growth curves")
    # Random weights make relevance meaningless and every answer inconclusive: judge every rule and
    # measure the scoring path; reasoning (identical generation work in both evaluators) is left out.
    options: JudgeOptions = Field(
        default_factory=lambda: JudgeOptions(relevance_filter=False, max_reasoning_calls=0)
    )
    served: bool = True
    mllm_instances: int = Field(1, ge=1)
    results: Path = Path("benchmarks/RESULTS.md")
    plots: Path = Path("benchmarks")


class VerdictMismatch(RuntimeError):
    """Two paths judged the same image differently: the benchmark's numbers would mean nothing."""


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
        return self.mean([w.tokens_processed / m for w, m in zip(self.work, self.minimum_tokens, strict=True) if m])

    @property
    def reasoning_calls(self) -> float:
        return self.mean([v.reasoning_calls for v in self.verdicts])


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
    mllm = models.mllm
    started = time.perf_counter()
    for image in images:
        before = mllm.stats.copy() if hasattr(mllm, "stats") else None
        t = time.perf_counter()
        verdict = judge(image, compiled, models, options)
        run.latencies_s.append(time.perf_counter() - t)
        run.verdicts.append(verdict)
        if before is not None:
            run.work.append(mllm.stats - before)
            run.minimum_tokens.append(mllm.minimum_tokens(image, _statements_judged(verdict, compiled)))
    run.wall_s = time.perf_counter() - started
    return run


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
        clients[0].judge(images[0], constitution, payload)  # warm-up: compile and first-call costs
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


def _row(run: Run, baseline: Run | None) -> str:
    speedup = f"{run.images_per_s / baseline.images_per_s:.1f}×" if baseline else "—"
    work = f"{run.forward_passes:.1f} | {run.token_ratio:.2f}×" if run.work else "— | —"
    return (
        f"| {run.name} | {len(run.latencies_s)} | {run.images_per_s:.3f} | {run.percentile(50):.0f} | "
        f"{run.percentile(95):.0f} | {run.percentile(99):.0f} | {work} | {run.reasoning_calls:.1f} | {speedup} |"
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
    """Run everything, check agreement, return the Markdown report (also appended to settings.results)."""
    command = "safejudge bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "run_bench(...)"
    base = load_constitution(settings.constitution)
    if settings.constitution_rules:
        base = scaled_constitution(base, settings.constitution_rules)
    log(f"loading {settings.models.mllm} ...")
    models = load_models(settings.models)
    compiled = compile_constitution(base, models)
    options = settings.options
    images = bench_images(settings.images, settings.image_size)

    log("sequential reference (Algorithm 1) ...")
    sequential = run_in_process("sequential (paper's loop)", judge_sequential, images[: settings.sequential_images],
                                compiled, models, options)
    log("engine in process ...")
    judge_batched(images[0], compiled, models, options)  # warm-up
    batched = run_in_process("engine in process", judge_batched, images, compiled, models, options)
    check_agreement(batched, sequential)

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

    report = _report(settings, command, base, sequential, batched, served, rule_points, size_points)
    _plots(settings, batched, served, rule_points)
    settings.results.parent.mkdir(parents=True, exist_ok=True)
    with settings.results.open("a", encoding="utf-8") as out:
        out.write(report)
    return report


def _served_runs(settings: BenchSettings, base: Constitution, images: Sequence[Image.Image], log) -> list[Run]:
    from safejudge.server import ServeSettings

    encoded = [png_bytes(image) for image in images]
    with tempfile.TemporaryDirectory(prefix="safejudge-bench-") as directory:
        Path(directory, f"{base.name}.yaml").write_text(yaml.safe_dump(base.model_dump(mode="json"), sort_keys=False))
        serve = ServeSettings(
            models=settings.models, constitutions=Path(directory), grpc_port=0, http_port=0, metrics_port=0,
            mllm_instances=settings.mllm_instances, judge_instances=max(settings.concurrency),
        )
        log("starting the server ...")
        with serve.server() as server:
            runs = []
            for concurrency in settings.concurrency:
                log(f"served, concurrency {concurrency} ...")
                runs.append(run_served(server.url, encoded, base.name, settings.options, concurrency,
                                       max(settings.requests_per_level, concurrency)))
            return runs


def _report(settings, command, base, sequential: Run, batched: Run, served: list[Run], rule_points, size_points) -> str:
    header = "| path | images | images/s | p50 ms | p95 ms | p99 ms | MLLM passes/image | tokens vs minimum | reasoning calls/image | vs sequential |"
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {base.name} ({len(base.enabled_rules)} rules, "
        f"{len(all_statements(base.enabled_rules))} questions), {settings.image_size}px\n",
        f"Machine: {machine_facts(settings)}. Random weights cost what real ones cost; these numbers say "
        "nothing about accuracy.\n",
        f"Command: `{command}`\n",
        f"Options: `{settings.options.model_dump_json(exclude_defaults=True)}`. Verdicts of every path agreed "
        f"on every image (sequential: {len(sequential.verdicts)}, engine: {len(batched.verdicts)}, served: "
        f"{sum(len(r.verdicts) for r in served)}).\n",
        header,
        "|" + "---|" * (header.count("|") - 1),
        _row(sequential, sequential),
        _row(batched, sequential),
        *(_row(run, sequential) for run in served),
        "",
        f"- engine in process vs sequential: **{batched.images_per_s / sequential.images_per_s:.1f}×** images/s "
        "(goal ≥ 10×)",
        f"- tokens processed per image: engine **{batched.token_ratio:.2f}×** the minimum (goal ≤ 1.15×), "
        f"sequential {sequential.token_ratio:.2f}×",
    ]
    if served:
        first = served[0]
        lines.append(
            f"- served p50 at concurrency {settings.concurrency[0]}: {first.percentile(50):.0f} ms vs in-process "
            f"{batched.percentile(50):.0f} ms (overhead {first.percentile(50) - batched.percentile(50):+.1f} ms; goal ≤ +3 ms)"
        )
        by_level = {int(r.name.split("=")[1]): r for r in served}
        if 1 in by_level and 4 in by_level:
            lines.append(
                f"- served throughput at concurrency 4 vs 1: {by_level[4].images_per_s / by_level[1].images_per_s:.2f}× "
                "(goal ≥ 1.5×)"
            )
    if len(rule_points) > 1:
        slope, intercept = fit_slope([q for _, q, _ in rule_points], [r.mean(r.latencies_s) * 1000 for _, _, r in rule_points])
        growth = (f"Latency ≈ {intercept:.0f} ms + {slope:.1f} ms per question (least squares): the image prefix is "
                  "paid once, each added question costs only its own tokens.\n")
    else:
        growth = ""
    lines += [
        "",
        "Cost growth (engine in process):\n",
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
