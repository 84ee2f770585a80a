"""`safejudge explain`: the explanation the engine adds on request, its terminal and HTML renderings, the CLI
in process (demo models on a toy scene) and against a server, and the page in a real headless browser."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageStat
from rich.console import Console
from typer.testing import CliRunner

from safejudge.backends.base import Detection, Models
from safejudge.cli import app
from safejudge.compiled import compile_constitution
from safejudge.constitution import Constitution, Thresholds, load_constitution
from safejudge.evaluators import JudgeOptions, judge_batched, judge_sequential
from safejudge.explain import html_page, terminal_view
from safejudge.images import crop_region, remove_region
from safejudge_client.verdict import DecidedBy, Outcome, Verdict, ViewKind
from tests.fakes import ScriptedDetector, ScriptedMLLM, ScriptedRelevance

REPO = Path(__file__).resolve().parent.parent
SCRIPT_TEXT = "<script>document.body.className = 'ran'</script> a knife"


def scene() -> Image.Image:
    image = Image.new("RGB", (200, 200), (235, 225, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 110, 110), fill=(40, 40, 160))  # the "knife": its box is removed
    draw.ellipse((150, 150, 168, 168), fill=(230, 80, 20))  # the "flame": a tiny box, cropped
    return image


IMAGE = scene()
KNIFE_BOX, FLAME_BOX = (20, 20, 110, 110), (150, 150, 168, 168)  # 20 % and 0.8 % of the image

# Prior 0.5 everywhere: alpha1 fails below 0.35, alpha2 holds above 0.9; beta: a drop of more than 0.6.
PRIOR = {text: 0.5 for text in (
    "a person is visible", "a knife is visible", "a blade is visible", "flames are visible", "a house is visible",
    "a skull is visible", "smoke is visible", "a car is visible",
)}
SCORES = {
    "a person is visible": 0.7,  # inconclusive, no central object: reasoning says yes
    "a knife is visible": 0.8,  # inconclusive; 0.1 without the knife: beta
    "a blade is visible": 0.2,  # alpha1
    "flames are visible": 0.6,  # inconclusive; the crop scores 0.97: alpha2 on the crop
    "a house is visible": 0.95,  # alpha2
    "a skull is visible": 0.95,  # never asked: its rule is skipped by relevance
    "smoke is visible": 0.1,  # alpha1: the rule is not violated
    "a car is visible": 0.95,  # alpha2, in a rule already cleared
}
VIEW = {"a knife is visible": 0.1, "flames are visible": 0.97}
RATIONALE = "a <b>stick figure</b> & a knife"


def constitution() -> Constitution:
    def rule(index, text, chain):
        return {
            "id": f"r{index}", "title": f"rule {index}", "category": "test", "text": text,
            "preconditions": [[{"text": t, "central_object": o} for t, o in item] for item in chain],
        }

    return Constitution.model_validate({"name": "explained", "version": "1", "rules": [
        rule(0, SCRIPT_TEXT, [[("a person is visible", None)], [("a knife is visible", "knife"),
                                                               ("a blade is visible", None)]]),
        rule(1, "flames at a house", [[("flames are visible", "flame")], [("a house is visible", None)]]),
        rule(2, "a skull", [[("a skull is visible", "skull")]]),
        rule(3, "smoke at a car", [[("smoke is visible", None)], [("a car is visible", None)]]),
    ]})


def scripted_models() -> tuple[Models, ScriptedMLLM]:
    unit = np.eye(3, dtype=np.float32)
    relevance = ScriptedRelevance(
        texts={
            SCRIPT_TEXT: unit[0],
            "flames at a house": 0.6 * unit[0] + 0.8 * unit[1],
            "a skull": 0.2 * unit[0] + np.sqrt(0.96) * unit[1],  # 0.2 <= t = 0.22: skipped
            "smoke at a car": 0.5 * unit[0] + np.sqrt(0.75) * unit[2],
        },
        image_vector=unit[0],
    )
    mllm = ScriptedMLLM(IMAGE, dict(SCORES), dict(PRIOR), dict(VIEW), {
        "a person is visible": json.dumps({"rating": "Yes", "rationale": RATIONALE})
    })
    detector = ScriptedDetector({"knife": Detection(KNIFE_BOX, 0.9), "flame": Detection(FLAME_BOX, 0.8)})
    return Models(mllm=mllm, relevance=relevance, detector=detector), mllm


@pytest.fixture(scope="module")
def explained() -> Verdict:
    models, _ = scripted_models()
    return judge_batched(IMAGE, compile_constitution(constitution(), models), models, JudgeOptions(explain=True))


def test_the_explanation_has_every_rule_its_relevance_tests_and_strategy2_boxes(explained):
    explanation = explained.explanation
    assert explanation.thresholds == Thresholds().model_dump()
    (frame,) = explanation.frames
    assert frame.frame == 0
    rules = {rule.rule_id: rule for rule in frame.rules}
    assert list(rules) == ["r0", "r1", "r2", "r3"], "every enabled rule, in constitution order"
    assert [rules[r].relevance for r in rules] == pytest.approx([1.0, 0.6, 0.2, 0.5], abs=1e-6)
    assert [rules[r].considered for r in rules] == [True, True, False, True]
    assert [rules[r].outcome for r in rules] == [Outcome.SATISFIED, Outcome.SATISFIED, Outcome.NOT_EVALUATED,
                                                  Outcome.FAILED]
    assert sorted(explained.violated_rule_ids) == ["r0", "r1"]

    r0 = {e.text: e for e in rules["r0"].preconditions}
    assert [(e.item, e.alternative) for e in rules["r0"].preconditions] == [(0, 0), (1, 0), (1, 1)]
    person, knife, blade = r0["a person is visible"], r0["a knife is visible"], r0["a blade is visible"]
    assert (person.decided_by, person.rationale, person.view) == (DecidedBy.REASONING, RATIONALE, None)
    assert (knife.decided_by, knife.view, knife.central_object) == (DecidedBy.BETA, ViewKind.REMOVED, "knife")
    assert (knife.score, knife.prior, knife.score_without_center) == pytest.approx((0.8, 0.5, 0.1))
    assert (blade.decided_by, blade.outcome, blade.score) == (DecidedBy.ALPHA1, Outcome.FAILED, pytest.approx(0.2))
    (flames, house) = rules["r1"].preconditions
    assert (flames.decided_by, flames.view, flames.score) == (DecidedBy.ALPHA2, ViewKind.CROP, pytest.approx(0.97))
    assert house.decided_by == DecidedBy.ALPHA2
    (skull,) = rules["r2"].preconditions
    assert (skull.outcome, skull.decided_by, skull.score, skull.prior) == (
        Outcome.NOT_EVALUATED, DecidedBy.NONE, None, None
    ), "a skipped rule's preconditions are listed, nothing asked"
    assert rules["r3"].preconditions[0].decided_by == DecidedBy.ALPHA1

    views = {view.central_object: view for view in frame.views}
    assert set(views) == {"knife", "flame"}
    assert (views["knife"].box, views["knife"].confidence, views["knife"].kind) == (KNIFE_BOX, 0.9, ViewKind.REMOVED)
    assert (views["flame"].box, views["flame"].confidence, views["flame"].kind) == (FLAME_BOX, 0.8, ViewKind.CROP)


def test_explain_costs_no_model_call_and_is_absent_unless_asked():
    plain_models, plain_mllm = scripted_models()
    explained_models, explained_mllm = scripted_models()
    compiled = compile_constitution(constitution(), plain_models)
    plain_mllm.score_calls.clear()  # the priors' call
    plain = judge_batched(IMAGE, compiled, plain_models)
    explained = judge_batched(IMAGE, compiled, explained_models, JudgeOptions(explain=True))
    assert plain.explanation is None and explained.explanation is not None
    assert plain_mllm.score_calls == explained_mllm.score_calls
    assert plain_mllm.reason_calls == explained_mllm.reason_calls
    assert plain.decision() == explained.decision() and plain.mllm_calls == explained.mllm_calls
    assert JudgeOptions.model_validate_json('{"explain": true}').explain


def test_sequential_explains_the_same_outcomes_and_what_it_never_asked():
    models, _ = scripted_models()
    compiled = compile_constitution(constitution(), models)
    batched = judge_batched(IMAGE, compiled, models, JudgeOptions(explain=True)).explanation.frames[0]
    sequential = judge_sequential(IMAGE, compiled, models, JudgeOptions(explain=True)).explanation.frames[0]
    assert [(r.rule_id, r.outcome) for r in sequential.rules] == [(r.rule_id, r.outcome) for r in batched.rules]
    # r3 fails at its first item: the paper's loop never asks whether a car is visible; the engine did.
    assert sequential.rules[3].preconditions[1].outcome == Outcome.NOT_EVALUATED
    assert sequential.rules[3].preconditions[1].score is None
    assert batched.rules[3].preconditions[1].decided_by == DecidedBy.ALPHA2


def test_the_wire_carries_the_explanation_and_old_verdicts_still_parse(explained):
    assert Verdict.model_validate_json(explained.model_dump_json()) == explained
    old = json.loads(explained.model_dump_json(exclude={"explanation"}))
    for violation in old["violations"]:
        for evidence in violation["evidence"]:
            del evidence["central_object"], evidence["view"]
    assert Verdict.model_validate(old).explanation is None
    newer = json.loads(explained.model_dump_json())
    newer["explanation"]["frames"][0]["views"][0]["kind"] = "inpainted"
    newer["explanation"]["frames"][0]["rules"][0]["future_field"] = 1
    assert Verdict.model_validate(newer).explanation.frames[0].views[0].kind == "inpainted"


def test_the_terminal_view_is_readable_at_100_columns(explained):
    console = Console(width=100, record=True, color_system=None)
    console.print(terminal_view(explained))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    for expected in ("UNSAFE", "r0", "r1", "r2", "r3", "relevance 0.200 ≤ t 0.22", "β: Strategy 2", "α1: absent",
                     "α2: present", "reasoning", "0.970 (crop)", "stick figure", "knife", "removed",
                     "20, 20, 110, 110"):
        assert expected in text, expected


class _Sources(HTMLParser):
    """Every URL-bearing attribute of a page and the text of its <img> alt attributes."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value for name, value in attrs if name in ("src", "href", "srcset", "action", "data")]


def _decoded_uri(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


def _check_self_contained(page: str) -> _Sources:
    assert "http://" not in page and "https://" not in page
    sources = _Sources()
    sources.feed(page)
    assert sources.urls and all(url.startswith("data:image/") for url in sources.urls)
    assert not {"script", "link", "iframe", "object", "embed"} & set(sources.tags)
    return sources


def test_the_page_is_self_contained_escaped_and_shows_the_engines_views(explained):
    page = html_page(explained, {0: IMAGE})
    sources = _check_self_contained(page)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;stick figure&lt;/b&gt; &amp; a knife" in page
    original, *views = (_decoded_uri(url) for url in sources.urls)
    assert original.tobytes() == IMAGE.tobytes()
    # The views are the engine's own, recomputed from the boxes: the removal first (detector order), then the crop.
    assert [view.tobytes() for view in views] == [
        remove_region(IMAGE, KNIFE_BOX).tobytes(), crop_region(IMAGE, FLAME_BOX).tobytes()
    ]


def test_every_judged_frame_is_explained_and_matched_to_the_decoded_frames():
    from types import SimpleNamespace

    from safejudge.evaluators import judge_frames
    from safejudge.explain import ExplainError, judged_frames

    models, _ = scripted_models()
    other = IMAGE.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # not the scripted image: scored as a view
    models.mllm.view.update({text: 0.0 for text in PRIOR})
    verdict = judge_frames([IMAGE, other], compile_constitution(constitution(), models), models,
                           JudgeOptions(explain=True), frame_indices=[0, 5], frame_count=9)
    assert [frame.frame for frame in verdict.explanation.frames] == [0, 5]
    first, second = verdict.explanation.frames
    assert first.rules[0].outcome == Outcome.SATISFIED and second.rules[0].outcome == Outcome.FAILED
    assert {e.frame for rule in second.rules for e in rule.preconditions} == {5}

    decoded = SimpleNamespace(frames=[IMAGE, other], frame_indices=[0, 5])
    assert judged_frames(verdict, decoded) == {0: IMAGE, 5: other}
    page = html_page(verdict, judged_frames(verdict, decoded))
    assert 'id="frame-0"' in page and 'id="frame-5"' in page and "Frame 5 of 9" in page
    with pytest.raises(ExplainError, match=r"explains frames \[0, 5\] but the image decodes to frames \[0, 4\]"):
        judged_frames(verdict, SimpleNamespace(frames=[IMAGE, other], frame_indices=[0, 4]))


@pytest.fixture(scope="module")
def toy_scene_png(tmp_path_factory) -> Path:
    """A generated toy scene on which the demo models use Strategy 2 and reasoning, and find a violation."""
    from safejudge.backends.onnx_demo import load_demo_models
    from safejudge.evaluation import TOY_CONSTITUTION, demo_scenes

    toy, models = load_constitution(TOY_CONSTITUTION), load_demo_models()
    compiled = compile_constitution(toy, models)
    for item in demo_scenes(toy, 40, seed=0):
        verdict = judge_batched(item.scene.image, compiled, models, JudgeOptions(explain=True))
        frame = verdict.explanation.frames[0]
        reasoned = any(e.decided_by == DecidedBy.REASONING for r in frame.rules for e in r.preconditions)
        if frame.views and reasoned and not verdict.safe:
            path = tmp_path_factory.mktemp("toy") / "scene.png"
            item.scene.image.save(path)
            return path
    pytest.fail("no generated toy scene used Strategy 2 and reasoning in a violation: have the demo models changed?")


def _run(args: list[str], tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SAFEJUDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "100")
    return CliRunner().invoke(app, args)


def test_cli_local_with_the_demo_models_writes_the_page(toy_scene_png, tmp_path, monkeypatch):
    out = tmp_path / "explain.html"
    result = _run(["explain", str(toy_scene_png), "-c", "toy-world", "--local", "--html", str(out),
                   "--constitutions", str(REPO / "constitutions")], tmp_path, monkeypatch)
    assert result.exit_code == 1, result.output  # unsafe
    rule_ids = [rule.id for rule in load_constitution(REPO / "constitutions" / "toy-world.yaml").enabled_rules]
    for rule_id in rule_ids:
        assert rule_id in result.stdout
    assert "Strategy 2 views" in result.stdout and "reasoning" in result.stdout
    page = out.read_text()
    sources = _check_self_contained(page)
    assert len(sources.urls) >= 2, "the scene and at least one Strategy 2 view"
    for rule_id in rule_ids:
        assert f'id="rule-{rule_id}-frame-0"' in page


class _FakeClient:
    """Stands in for JudgeClient: judges in process with the demo models, records the request options."""

    requests: list[dict] = []
    drop_explanation = False

    def __init__(self, url, **settings):
        from safejudge.backends.onnx_demo import load_demo_models
        from safejudge.evaluation import TOY_CONSTITUTION

        self.models = load_demo_models()
        self.compiled = compile_constitution(load_constitution(TOY_CONSTITUTION), self.models)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def judge(self, image, constitution, options=None):
        from safejudge_client.client import encode_options

        sent = json.loads(encode_options(options))
        type(self).requests.append(sent)
        verdict = judge_batched(Image.open(io.BytesIO(image)).convert("RGB"), self.compiled, self.models,
                                JudgeOptions.model_validate(sent))
        return verdict.model_copy(update={"explanation": None}) if self.drop_explanation else verdict


def test_cli_url_asks_the_server_to_explain_and_recomputes_the_views(toy_scene_png, tmp_path, monkeypatch):
    import safejudge_client

    monkeypatch.setattr(safejudge_client, "JudgeClient", _FakeClient)
    monkeypatch.setattr(_FakeClient, "requests", [])
    out = tmp_path / "served.html"
    result = _run(["explain", str(toy_scene_png), "-c", "toy-world", "--html", str(out)], tmp_path, monkeypatch)
    assert result.exit_code == 1, result.output
    assert _FakeClient.requests == [{"explain": True}]
    assert len(_check_self_contained(out.read_text()).urls) >= 2

    monkeypatch.setattr(_FakeClient, "drop_explanation", True)  # a server that ignores explain
    result = _run(["explain", str(toy_scene_png), "-c", "toy-world"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and "has no explanation" in result.output
    result = _run(["explain", str(toy_scene_png), "-c", "toy-world", "--local", "--url", "h:1"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_cli_url_takes_the_client_flags_of_judge(toy_scene_png, tmp_path, monkeypatch):
    import safejudge_client

    class Constructed(Exception):
        pass

    def record(url, **kwargs):
        raise Constructed(url, kwargs)

    monkeypatch.setattr(safejudge_client, "JudgeClient", record)
    token = tmp_path / "token"
    token.write_text("secret\n")
    result = _run(["explain", str(toy_scene_png), "-c", "toy-world", "--url", "judge.example:8001", "--token-file",
                   str(token), "--tls-ca", "ca.pem", "--retries", "0", "--timeout", "5"], tmp_path, monkeypatch)
    assert isinstance(result.exception, Constructed), result.output
    assert result.exception.args == ("judge.example:8001", {
        "timeout_s": 5.0, "ssl": True, "root_certificates": "ca.pem", "token": "secret", "retries": 0,
    })


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (as root: apt-get install -y chromium); CI does not install it (~480 MB)",
)
def test_the_page_renders_in_a_headless_browser(explained, tmp_path):
    page = tmp_path / "explain.html"
    page.write_text(html_page(explained, {0: IMAGE}), encoding="utf-8")
    shot = tmp_path / "explain.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,2000",
              f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], check=True, timeout=120, capture_output=True,
                         text=True).stdout

    screenshot = Image.open(shot).convert("RGB")
    assert screenshot.size == (1200, 2000)
    assert max(ImageStat.Stat(screenshot).stddev) > 20, "the screenshot is blank"
    red = np.asarray(screenshot).astype(int) - np.array([179, 38, 30])
    assert (np.abs(red).max(axis=-1) < 12).sum() > 5000, "no unsafe (red) header: the inline CSS did not apply"

    assert '<body class="ran"' not in dom, "a script in a rule text ran"
    assert '<img class="original" src="data:image/png;base64,' in dom
    for rule_id in ("r0", "r1", "r2", "r3"):
        assert f'id="rule-{rule_id}-frame-0"' in dom
    assert "&lt;script&gt;document.body.className" in dom, "the rule text is shown as text"
