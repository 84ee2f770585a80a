"""The engine's scoring schedules, "all" vs "waves", measured on one MLLM backend (benchmarks/RESULTS.md, "Schedules").

Outcomes are planned, not left to random weights: a wrapper runs the backend's real forward passes for every
question asked, then replaces the scores it returns by the plan's, so that a regime ("every rule fails at
its first item", "nothing fails") can be chosen while the work (forward passes, tokens, vision encodings)
and the time stay the backend's own. Priors are planned at 0.5: a score of 0.0 fails alpha1, 0.99 passes
alpha2, so neither Strategy 2 nor reasoning ever runs and only the scoring schedule differs.

    PYTHONPATH=.:client python benchmarks/measure_schedules.py --mllm tiny:qwen2-vl --rules 14 --images 6
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from safejudge.backends.base import Models
from safejudge.backends.registry import ModelSpec, load_mllm
from safejudge.compiled import all_statements, compile_constitution
from safejudge.constitution import Constitution, load_constitution
from safejudge.evaluators import JudgeOptions, judge_batched
from safejudge.shipped import CONSTITUTIONS
from tests.hf_fixtures import noise_image


class PlannedScores:
    """The backend's work, the plan's answers."""

    def __init__(self, mllm, plan: dict[str, float]):
        self.mllm, self.plan = mllm, plan
        self.model_id, self.fingerprint = mllm.model_id, mllm.fingerprint
        self.scoring_calls = 0

    @property
    def stats(self):
        return self.mllm.stats

    def score(self, image, questions: Sequence[str]) -> np.ndarray:
        self.mllm.score(image, questions)
        self.scoring_calls += image is not None
        return np.array([0.5 if image is None else self.plan[q] for q in questions])

    def reason(self, image, questions):
        return self.mllm.reason(image, questions)


def regimes(constitution: Constitution) -> dict[str, dict[str, float]]:
    statements = all_statements(constitution.enabled_rules)
    first = {alt.text for rule in constitution.enabled_rules for alt in rule.preconditions[0]}
    return {
        "first items fail": {s: 0.0 if s in first else 0.99 for s in statements},
        "nothing fails": dict.fromkeys(statements, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mllm", default="tiny:qwen2-vl")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--constitution", default=str(CONSTITUTIONS / "os-bench.yaml"))
    parser.add_argument("--rules", type=int, default=14, help="the constitution's first N rules")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--prefix-cache", type=int, default=4, help="HF prefix LRU entries (0: off)")
    args = parser.parse_args()

    base = load_constitution(args.constitution)
    constitution = base.model_copy(update={"rules": base.enabled_rules[: args.rules]})
    mllm = load_mllm(ModelSpec(mllm=args.mllm, relevance=None, dtype=args.dtype, threads=args.threads))
    if hasattr(mllm, "prefix_cache_size"):
        mllm.prefix_cache_size = args.prefix_cache
    questions = len(all_statements(constitution.enabled_rules))
    print(
        f"{args.mllm} {args.dtype}, {args.threads} thread(s), {len(constitution.enabled_rules)} rules, {questions} questions, "
        f"{args.images} images of {args.size}px, prefix cache {args.prefix_cache}"
    )
    # CPU time (this process) is less disturbed by other load on a shared machine than wall time.
    print("| regime | schedule | images/s | ms/image | CPU ms/image | scoring calls/image | questions/image | forward passes/image "
          "| tokens processed/image | vision encodings/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    run = 0
    for regime, plan in regimes(constitution).items():
        planned = PlannedScores(mllm, plan)
        models = Models(mllm=planned)
        compiled = compile_constitution(constitution, models)
        for schedule in ("all", "waves"):
            options = JudgeOptions(schedule=schedule, relevance_filter=False, strategy2=False, max_reasoning_calls=0)
            # Fresh images every run, so that no run finds another's prefixes in the backend's cache.
            run += 1
            images = [noise_image(1000 * run + seed, args.size, args.size) for seed in range(args.images + 1)]
            judge_batched(images.pop(), compiled, models, options)  # warm-up (not counted)
            verdicts = []
            before, calls = mllm.stats.copy(), planned.scoring_calls
            started, cpu_started = time.perf_counter(), time.process_time()
            for image in images:
                verdicts.append(judge_batched(image, compiled, models, options))
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            used, n = mllm.stats - before, len(images)
            print(
                f"| {regime} | {schedule} | {n / elapsed:.2f} | {1000 * elapsed / n:.0f} | {1000 * cpu / n:.0f} | "
                f"{(planned.scoring_calls - calls) / n:.1f} | {sum(v.questions_scored for v in verdicts) / n:.1f} | "
                f"{used.forward_passes / n:.1f} | {used.tokens_processed / n:.0f} | {used.vision_encodings / n:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
