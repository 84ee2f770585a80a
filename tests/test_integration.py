"""The served pipeline end to end: a real Triton server, real gRPC, the tiny models of the real classes.

Every served verdict is checked against the in-process reference (`judge_sequential`, the paper's loop,
and `judge_batched`, the same engine without Triton) on the same weights. Raw tritonclient calls prove
the wire format documented in README; the client library is checked on the same server.
"""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw
from tritonclient.utils import InferenceServerException

from safejudge.compiled import compile_constitution
from safejudge.constitution import load_constitution
from safejudge.evaluators import judge_batched, judge_sequential
from safejudge.images import decode_image
from safejudge.pipeline import RequestLimits, parse_options
from safejudge.shipped import PROJECT_ROOT
from safejudge_client import InvalidRequest, JudgeClient, Verdict

pytest_plugins = ["tests.server_fixtures"]
pytestmark = pytest.mark.integration

# Served and in-process judge_batched make the very same MLLM calls: their scores must agree closely.
SCORE_TOLERANCE = 1e-5
# The sequential loop scores one question per call; a different batch changes the fp32 summation order
# inside the model, measured up to 1.0e-5 on the tiny Qwen2-VL (same process, no server involved).
SEQUENTIAL_TOLERANCE = 1e-4
CONSTITUTION_FILES = sorted((PROJECT_ROOT / "constitutions").glob("*.yaml"))


def scene(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic picture: a noisy background with a few coloured shapes."""
    rng = np.random.default_rng(seed)
    width, height = size
    background = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB").convert(mode)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(4, width // 2)), y0 + int(rng.integers(4, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=len(mode)))
        draw.ellipse((x0, y0, x1, y1), fill=colour if len(colour) > 1 else colour[0])
    return image


def encoded(image: Image.Image, image_format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


IMAGES = {
    "png-64x48": encoded(scene((64, 48), 1), "PNG"),
    "jpeg-160x96": encoded(scene((160, 96), 2), "JPEG", quality=90),
    "webp-40x90": encoded(scene((40, 90), 3), "WEBP"),
    "gif-palette-48x48": encoded(scene((48, 48), 4, "P"), "GIF"),
    "png-rgba-80x60": encoded(scene((80, 60), 5, "RGBA"), "PNG"),
}
# The tiny CLIP's cosines are arbitrary (it skips most rules): without the filter every rule reaches the
# MLLM. Reasoning (two generations per question) dominates the cost, so most cases do without it and one
# image per constitution runs the full cascade.
OPTION_SETS = {
    "default": None,
    "all-rules-no-reasoning": {"relevance_filter": False, "max_reasoning_calls": 0},
    "all-rules": {"relevance_filter": False},
}
CASES = [(image, "default") for image in IMAGES]
CASES += [(image, "all-rules-no-reasoning") for image in list(IMAGES)[:3]]
CASES += [("jpeg-160x96", "all-rules")]


def infer_raw(url: str, image: bytes, constitution: str, options: bytes | str | None = None) -> Verdict:
    """One `safety_judge` request exactly as README shows it: BYTES tensors of shape [1, 1]."""
    inputs = []
    for name, value in (("IMAGE", image), ("CONSTITUTION", constitution), ("OPTIONS", options)):
        if value is None:
            continue
        tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value.encode() if isinstance(value, str) else value]], dtype=object))
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("safety_judge", inputs, outputs=[grpcclient.InferRequestedOutput("VERDICT")])
    return Verdict.model_validate_json(result.as_numpy("VERDICT")[0, 0])


def assert_same_scores(served: Verdict, reference: Verdict, tolerance: float = SCORE_TOLERANCE, loop: bool = False) -> None:
    """Scores of every precondition both evaluated, rule by rule, agree to tolerance.

    The paper's loop runs Strategy 2 on an inconclusive alternative even when a later alternative of the same
    item holds outright; the engine skips what cannot change the verdict. So against the loop (loop=True), a
    score without the central object is compared where both computed it."""
    reference_evidence = {
        (v.rule_id, e.item, e.alternative): e for v in reference.violations for e in v.evidence
    }
    compared = 0
    for violation in served.violations:
        for evidence in violation.evidence:
            other = reference_evidence.get((violation.rule_id, evidence.item, evidence.alternative))
            if other is None or other.score is None:
                continue  # the sequential loop stops an item at its first satisfied alternative
            for field in ("score", "prior", "score_without_center"):
                ours, theirs = getattr(evidence, field), getattr(other, field)
                if loop and field == "score_without_center" and None in (ours, theirs):
                    continue
                assert (ours is None) == (theirs is None), (violation.rule_id, evidence.text, field)
                if ours is not None:
                    assert abs(ours - theirs) <= tolerance, (violation.rule_id, evidence.text, field, ours, theirs)
            compared += 1
    assert compared or not served.violations, "violations must carry comparable evidence"


@pytest.fixture(scope="module")
def compiled_constitutions(tiny_models):
    return {path.stem: compile_constitution(load_constitution(path), tiny_models) for path in CONSTITUTION_FILES}


@pytest.fixture(scope="module")
def served_and_reference(triton_server, tiny_models, compiled_constitutions):
    """Every image x constitution x option set: (served, in-process sequential, in-process batched)."""
    results = {}
    for name, compiled in compiled_constitutions.items():
        for image_name, options_name in CASES:
            data, options = IMAGES[image_name], OPTION_SETS[options_name]
            served = infer_raw(
                triton_server.url, data, compiled.constitution.name, json.dumps(options) if options else None
            )
            # The served defaults (e.g. the reasoning budget per image) apply to the reference too.
            parsed = parse_options(json.dumps(options).encode() if options else None, RequestLimits())
            image = decode_image(data).frames[0]
            # The served judge takes the mllm backend's preferred schedule, as the in-process engine does.
            results[(name, image_name, options_name)] = (
                served,
                judge_sequential(image, compiled, tiny_models, parsed),
                judge_batched(image, compiled, tiny_models, parsed),
            )
    return results


def test_both_shipped_constitutions_are_served():
    names = {path.stem for path in CONSTITUTION_FILES}
    assert {"os-bench", "general"} <= names, f"constitutions/ holds {sorted(names)}"


def test_served_verdicts_equal_the_in_process_reference(served_and_reference, tiny_models):
    for case, (served, sequential, batched) in served_and_reference.items():
        assert served.decision() == sequential.decision(), case
        assert served.decision() == batched.decision(), case
        assert served.evaluator == "batched" and served.model_id == tiny_models.mllm.model_id, case
        assert served.rules_considered == batched.rules_considered == sequential.rules_considered, case
        assert served.mllm_calls == batched.mllm_calls, case
        assert_same_scores(served, sequential, SEQUENTIAL_TOLERANCE, loop=True)
        assert_same_scores(served, batched)


def test_the_comparison_covers_real_work(served_and_reference):
    """Guards the test above against passing vacuously (everything skipped, nothing violated)."""
    verdicts = [served for served, _, _ in served_and_reference.values()]
    unfiltered = [v for (_, _, options), (v, _, _) in served_and_reference.items() if options != "default"]
    assert all(v.rules_considered and not v.rules_skipped_by_relevance for v in unfiltered)
    assert any(v.violations for v in verdicts), "no served verdict found a violation to compare evidence on"
    assert any(v.reasoning_calls for v in verdicts), "the reasoning stage (MODE reason) was never exercised"
    assert sum(len(e.evidence) for v in verdicts for e in v.violations) >= 10
    assert len({v.constitution for v in verdicts}) == len(CONSTITUTION_FILES)


def test_concurrent_requests_get_the_same_verdicts(triton_server, served_and_reference):
    """Concurrent requests are judged side by side, their MLLM calls merged; each keeps its own answers."""
    cases = [case for case in served_and_reference if case[2] == "all-rules-no-reasoning"][:4]
    with ThreadPoolExecutor(len(cases)) as pool:
        verdicts = list(
            pool.map(
                lambda case: infer_raw(
                    triton_server.url,
                    IMAGES[case[1]],
                    served_and_reference[case][0].constitution,
                    json.dumps(OPTION_SETS[case[2]]),
                ),
                cases,
            )
        )
    for case, verdict in zip(cases, verdicts, strict=True):
        expected = served_and_reference[case][0]
        assert verdict.decision() == expected.decision(), case
        assert_same_scores(verdict, expected)


def test_the_client_library_gets_the_same_verdict(triton_server, served_and_reference):
    case = next(case for case in served_and_reference if case[2] == "all-rules-no-reasoning")
    expected = served_and_reference[case][0]
    with JudgeClient(triton_server.url) as client:
        verdict = client.judge(IMAGES[case[1]], expected.constitution, OPTION_SETS[case[2]])
        assert verdict.decision() == expected.decision()
        assert_same_scores(verdict, expected)
        with pytest.raises(InvalidRequest, match="unknown constitution 'no-such-constitution'"):
            client.judge(IMAGES[case[1]], "no-such-constitution")


def truncated_png() -> bytes:
    data = IMAGES["png-64x48"]
    return data[: len(data) // 2]


# name: (IMAGE or None for a good one, CONSTITUTION or None, OPTIONS or None, expected message part)
BAD_REQUESTS = {
    "garbage bytes": (b"definitely not an image", None, None, "cannot identify image file"),
    "truncated png": (truncated_png(), None, None, "image is truncated or corrupt"),
    "zero bytes": (b"", None, None, "image is empty (0 bytes)"),
    "unknown constitution": (None, "nope", None, "unknown constitution 'nope'; known: "),
    "options not json": (None, None, "{not json", "OPTIONS is not valid JudgeOptions JSON: "),
    "unknown option": (None, None, '{"evidense": "full"}', "evidense: Extra inputs are not permitted"),
    "option out of range": (
        None,
        None,
        '{"max_reasoning_calls": -1}',
        "max_reasoning_calls: Input should be greater than or equal to 0",
    ),
    "threshold out of range": (
        None,
        None,
        '{"thresholds": {"relevance": 3.0}}',
        "thresholds: relevance: Input should be less than or equal to 1",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(triton_server, name):
    image, constitution, options, message = BAD_REQUESTS[name]
    good_image, good_constitution = IMAGES["png-64x48"], load_constitution(CONSTITUTION_FILES[0]).name
    with pytest.raises(InferenceServerException) as raised:
        infer_raw(triton_server.url, good_image if image is None else image, constitution or good_constitution, options)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.message()
    assert message in raised.value.message()
    assert infer_raw(triton_server.url, good_image, good_constitution).constitution == good_constitution


HOT_RELOAD_CONSTITUTION = """
name: hot-reload
version: "{version}"
rules:
  - id: red-object
    title: A red object
    category: test
    severity: low
    text: A red object is visible.
    preconditions:
      - A red object is visible
"""


def test_a_new_or_edited_constitution_is_served_without_restart(triton_server, served_constitutions):
    path = served_constitutions / "hot-reload.yaml"
    image = IMAGES["png-64x48"]
    try:
        with pytest.raises(InferenceServerException, match="unknown constitution 'hot-reload'"):
            infer_raw(triton_server.url, image, "hot-reload")
        path.write_text(HOT_RELOAD_CONSTITUTION.format(version="1.0"))
        first = infer_raw(triton_server.url, image, "hot-reload", '{"relevance_filter": false}')
        assert (first.constitution, first.constitution_version) == ("hot-reload", "1.0")
        assert first.rules_considered == ["red-object"]
        path.write_text(HOT_RELOAD_CONSTITUTION.format(version="2.0.0"))
        # The edit is served once the file has been unchanged for the settle time; the last good version
        # until then, never an error.
        versions = [infer_raw(triton_server.url, image, "hot-reload").constitution_version]
        while versions[-1] != "2.0.0" and len(versions) < 50:
            time.sleep(0.1)
            versions.append(infer_raw(triton_server.url, image, "hot-reload").constitution_version)
        assert versions[-1] == "2.0.0" and set(versions) <= {"1.0", "2.0.0"}, versions
    finally:
        path.unlink(missing_ok=True)



def scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    """The metrics port's samples: (name, labels) -> value."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r'([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)', line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def delta(after, before, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and wanted <= k[1])


def test_engine_metrics_are_served_on_the_metrics_port(triton_server):
    before = scrape(triton_server.metrics_url)
    options = json.dumps({"relevance_filter": False, "max_reasoning_calls": 0})
    verdicts = [infer_raw(triton_server.url, IMAGES[name], "os-bench", options) for name in ("png-64x48", "jpeg-160x96")]
    with pytest.raises(InferenceServerException):
        infer_raw(triton_server.url, b"not an image", "os-bench")
    after = scrape(triton_server.metrics_url)

    assert delta(after, before, "safejudge_verdicts_total", constitution="os-bench") == 2
    unsafe = sum(not v.safe for v in verdicts)
    assert delta(after, before, "safejudge_verdicts_total", constitution="os-bench", verdict="unsafe") == unsafe
    for verdict in verdicts:
        for rule in verdict.violated_rule_ids:
            assert delta(after, before, "safejudge_rule_violations_total", constitution="os-bench", rule=rule) >= 1
    decided = sum(sum(v.preconditions_decided.values()) for v in verdicts)
    assert decided > 0 and delta(after, before, "safejudge_preconditions_decided_total", constitution="os-bench") == decided
    tests = {dict(k[1])["test"] for k in after if k[0] == "safejudge_preconditions_decided_total"}
    assert tests <= {"alpha1", "alpha2", "beta", "reasoning", "unparsed", "budget", "undecided"} and tests
    assert delta(after, before, "safejudge_frames_judged_total", constitution="os-bench") == 2
    assert delta(after, before, "safejudge_request_errors_total", kind="INVALID_ARGUMENT") == 1
    assert delta(after, before, "safejudge_judge_seconds_count", constitution="os-bench") == 3
    assert any(k[0] == "safejudge_judge_seconds_bucket" for k in after)
    info = [dict(k[1]) for k, v in after.items() if k[0] == "safejudge_constitution_info" and v == 1]
    assert {"constitution": "os-bench", "state": "compiled"}.items() <= next(
        i for i in info if i["constitution"] == "os-bench").items()


def test_a_flood_of_unknown_constitution_names_adds_a_bounded_number_of_series(triton_server):
    """The issue's reproduction: 50 unknown names created 801 new safejudge_ series (each name a label)."""
    with pytest.raises(InferenceServerException):  # after this, the one label for unknown names exists
        infer_raw(triton_server.url, IMAGES["png-64x48"], "nope-warm-up")
    before = scrape(triton_server.metrics_url)
    for index in range(50):
        with pytest.raises(InferenceServerException, match="unknown constitution"):
            infer_raw(triton_server.url, IMAGES["png-64x48"], f"flood-{index}-{'x' * index}")
    after = scrape(triton_server.metrics_url)
    new_series = [k for k in after if k[0].startswith("safejudge_") and k not in before]
    assert new_series == [], new_series
    assert delta(after, before, "safejudge_request_errors_total", kind="INVALID_ARGUMENT") == 50
    assert delta(after, before, "safejudge_judge_seconds_count", constitution="(unknown)") == 50
    assert not any("flood" in value for k in after for _, value in k[1])


@pytest.mark.parametrize("options, lenient", [
    ('{"fail_closed": false}', "fail_closed: false"),
    ('{"thresholds": {"relevance": 0.9}}', "thresholds.relevance: 0.9 (this constitution's is 0.22)"),
])
def test_a_request_may_make_the_judgement_stricter_but_not_more_lenient(triton_server, options, lenient):
    with pytest.raises(InferenceServerException) as refused:
        infer_raw(triton_server.url, IMAGES["png-64x48"], "os-bench", options)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert lenient in refused.value.message() and "--allow-lenient-options" in refused.value.message()
    stricter = '{"thresholds": {"relevance": 0.1, "beta": 0.5}, "relevance_filter": false, "max_reasoning_calls": 0}'
    assert infer_raw(triton_server.url, IMAGES["png-64x48"], "os-bench", stricter).constitution == "os-bench"


def test_status_reports_health_models_constitutions_and_limits(triton_server, served_and_reference):
    from typer.testing import CliRunner

    from safejudge.cli import app

    result = CliRunner().invoke(app, ["status", "--url", triton_server.url, "--metrics-url", triton_server.metrics_url,
                                      "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["live"] and status["ready"] and not status["problems"], status
    models = {m["name"]: m for m in status["models"]}
    # One process per core for the small tiny models (one thread each; ServeSettings.instances).
    assert models["safety_judge"]["ready"] and models["safety_judge"]["instances"] == len(os.sched_getaffinity(0))
    assert models["safety_judge"]["max_queue_size"] == 64 and models["safety_judge"]["max_batch_size"] == 8
    assert status["settings"]["limits"]["frames"] == 8 and status["settings"]["models"]["mllm"] == "tiny:qwen2-vl"
    states = {c["name"]: c["state"] for c in status["constitutions"]}
    assert states["os-bench"] == states["general"] == "compiled", states
    table = CliRunner().invoke(app, ["status", "--url", triton_server.url, "--metrics-url", triton_server.metrics_url])
    assert table.exit_code == 0 and "os-bench" in table.output and "limits: frames 8" in table.output, table.output


@pytest.mark.parametrize("size", [(1, 1), (4000, 2), (2, 4000), (3, 3)])
def test_tiny_and_extreme_images_are_judged(triton_server, size):
    """Valid images are never refused for their size: every model pads or resizes them to what it needs."""
    image = scene(size, 9) if min(size) >= 8 else Image.new("RGB", size, (200, 30, 30))
    verdict = infer_raw(triton_server.url, encoded(image, "PNG"), "os-bench", '{"relevance_filter": false, "max_reasoning_calls": 0}')
    assert verdict.constitution == "os-bench" and verdict.rules_considered
