"""Do concurrent requests meet? Starts a safejudge server, drives `safety_judge` with the asyncio client at
several concurrency levels and prints, per level: verdicts/s, p50/p95 latency and, from Triton's statistics,
executions per request (1.0: no batching; 0.25: four requests judged side by side per execution, their
MLLM calls merged). Also judges the same images in this process (judge_frames, same models and threads)
for the served overhead at concurrency 1.

    PYTHONPATH=.:client python scripts/serving_batches.py                       # tiny:qwen2-vl, 1,2,4,8
    PYTHONPATH=.:client python scripts/serving_batches.py --companions none --concurrency 1

The server's stages import this checkout's code (PYTHONPATH is set for them). Timings on a shared machine
are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# As the launcher sets it for the stages: busy-waiting OpenMP threads starve everything else on a few cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"relevance_filter": False, "max_reasoning_calls": 0}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0


def in_process_judge(spec, data: list[bytes], constitution: Path) -> Callable[[int], float]:
    """judge(index) -> seconds: judge_frames in this process on the decoded image, as the safety_judge stage
    calls it, with the same models."""
    from safejudge.backends.registry import load_models
    from safejudge.compiled import compile_constitution
    from safejudge.constitution import load_constitution
    from safejudge.evaluators import judge_frames
    from safejudge.images import decode_image
    from safejudge.pipeline import RequestLimits, parse_options

    models = load_models(spec)
    compiled = compile_constitution(load_constitution(constitution), models)
    options = parse_options(json.dumps(OPTIONS).encode(), RequestLimits())
    frames = [decode_image(d).frames for d in data]

    def judge(index: int) -> float:
        started = time.perf_counter()
        judge_frames(frames[index % len(frames)], compiled, models, options)
        return time.perf_counter() - started

    judge(0)  # warm-up
    return judge


async def drive(url: str, data: list[bytes], constitution: str, levels: list[int], requests: int,
                reference: Callable[[int], float] | None = None) -> list[dict]:
    """One row per level; at concurrency 1 each served request is followed by the same image judged by
    reference (in process), so that both see the same machine load."""
    import tritonclient.grpc.aio as grpcclient

    from safejudge_client.client import build_inputs

    inputs = [build_inputs([image], constitution, OPTIONS) for image in data]  # built once, outside the timing

    async with grpcclient.InferenceServerClient(url) as client:

        async def counts(model: str) -> tuple[int, int, int]:
            """Requests, executions, and nanoseconds requests spent waiting in the model's queue."""
            stats = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
            queue_ns = int(stats["inference_stats"]["queue"].get("ns", 0))
            return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), queue_ns

        async def judge(index: int) -> float:
            started = time.perf_counter()
            await client.infer("safety_judge", inputs[index % len(inputs)], client_timeout=600)
            return time.perf_counter() - started

        await judge(0)  # compiles the constitution on the server
        rows = []
        for level in levels:
            await asyncio.gather(*(judge(i) for i in range(level)))  # warm-up at this level
            before = await counts("safety_judge")
            queue = iter(range(max(requests, level)))
            latencies: list[float] = []
            in_process: list[float] = []

            async def worker() -> None:
                for index in queue:
                    latencies.append(await judge(index))
                    if level == 1 and reference is not None:
                        in_process.append(reference(index))

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(level)))
            wall = time.perf_counter() - started - sum(in_process)
            after = await counts("safety_judge")
            rows.append({
                "concurrency": level, "requests": len(latencies), "verdicts_per_s": len(latencies) / wall,
                "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
                "executions_per_request": (after[1] - before[1]) / max(1, after[0] - before[0]),
                "queue_ms_per_verdict": (after[2] - before[2]) / 1e6 / len(latencies),
            })
            if in_process:
                rows[-1]["in_process_p50_ms"] = percentile(in_process, 50)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    # The stubs inherit this environment: they must import this checkout's safejudge.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "client"), os.environ.get("PYTHONPATH", "")])
    from safejudge.backends.registry import coherent_spec
    from safejudge.server import ServeSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mllm", default="tiny:qwen2-vl")
    parser.add_argument("--companions", choices=["default", "none"], default="default",
                        help="relevance encoder and detector: the MLLM's default companions, or none")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least the level)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    defaults = ServeSettings.model_fields
    parser.add_argument("--judge-instances", type=int, default=defaults["judge_instances"].default,
                        help="safety_judge processes, each with its own models")
    parser.add_argument("--max-batch", type=int, default=defaults["max_batch"].default)
    parser.add_argument("--batch-delay-us", type=int, default=defaults["batch_delay_us"].default)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per instance (default: served_threads)")
    parser.add_argument("--constitution", type=Path, default=ROOT / "constitutions" / "os-bench.yaml")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process reference")
    args = parser.parse_args()
    spec = coherent_spec(args.mllm, threads=args.threads)[0]
    if args.companions == "none":
        spec = spec.model_copy(update={"relevance": None, "detector": None})
    from safejudge.bench import bench_images, png_bytes

    data = [png_bytes(image) for image in bench_images(args.images, args.size)]
    levels = [int(level) for level in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="serving-batches-") as directory:
        constitutions = Path(directory, "constitutions")
        constitutions.mkdir()
        (constitutions / args.constitution.name).write_bytes(args.constitution.read_bytes())
        settings = ServeSettings(
            models=spec, constitutions=constitutions, cache_dir=Path(directory, "compiled"),
            grpc_port=0, http_port=0, metrics_port=0, judge_instances=args.judge_instances,
            max_batch=args.max_batch, batch_delay_us=args.batch_delay_us,
        )
        # The served MLLM's thread count, so that both paths get the same compute.
        reference = None if args.no_in_process else in_process_judge(
            spec.model_copy(update={"threads": settings.threads_per_instance()}), data, args.constitution)
        with settings.server() as server:
            name = args.constitution.stem
            try:
                rows = asyncio.run(drive(server.url, data, name, levels, args.requests, reference))
            except Exception:
                print(f"server log, last lines:\n{server.log_tail(60)}", flush=True)
                raise
    print(f"\n{args.mllm}, companions {args.companions}, {settings.instances()} safety_judge instance(s), "
          f"max batch {args.max_batch} (delay {args.batch_delay_us} us), {args.size}px, "
          f"options {json.dumps(OPTIONS)}")
    print("| concurrency | requests | verdicts/s | p50 ms | p95 ms | executions/request | queue ms/verdict |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['requests']} | {row['verdicts_per_s']:.1f} | {row['p50_ms']:.0f} | "
              f"{row['p95_ms']:.0f} | {row['executions_per_request']:.2f} | {row['queue_ms_per_verdict']:.1f} |")
    for row in rows:
        if "in_process_p50_ms" in row:
            print(f"\nserved p50 at concurrency 1: {row['p50_ms']:.1f} ms; in process, interleaved: "
                  f"{row['in_process_p50_ms']:.1f} ms (overhead {row['p50_ms'] - row['in_process_p50_ms']:+.1f} ms)")
    print(f"load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())} (indicative: shared machine)")


if __name__ == "__main__":
    main()
