"""The prompt stage takes what a model really answers: structured output, `<think>` blocks, lead-ins, headings and
refusals, a whole-request timeout, $OLLAMA_HOST, and cuts at a clause end. Against tests/_ollama_server.py on
127.0.0.1, stage by stage and through `dhbatch build`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from renderer.base import BackendError, ModelPool, StepJob
from renderer.llm import RefusalError, clean_prompt, run, shorten
from tests._http_util import canned_server
from tests._ollama import FakeOllama

THINK = "<think>\nThe user wants a prompt. Let me think: a CEO...\n</think>\n\nportrait of a CEO, 85mm"
REFUSAL = "I'm sorry, but I can't help with creating images of real people."
CHATTY = "## Stable Diffusion prompt\n\n**Here is your prompt:**\n\nportrait of a nurse, soft light"


def job(tmp_path: Path, name: str, **settings: object) -> StepJob:
    out = tmp_path / name
    out.mkdir()
    resolved = {"engine": "ollama", "model": None, "host": None, "temperature": 0.7, "max_length": 200, "timeout": 30}
    resolved.update(settings)
    return StepJob("prompt", name, resolved, {}, out, text=f"Draw {name}.", seed=1, label=f"characters.{name}")


def serve(tmp_path: Path, *args: str) -> FakeOllama:
    return FakeOllama(tmp_path, "--model", "gemma:2b", *args)


def test_llm_answers_think_block_lead_in_and_heading_never_become_the_prompt(tmp_path: Path) -> None:
    server = serve(
        tmp_path, "--ignore-format", "--reply-for", f"think={THINK}", "--reply-for", f"chatty={CHATTY}",
        "--reply-for", "open=<think>I should draw a CEO in a suit, maybe",
    )  # fmt: skip
    try:
        think, chatty, unclosed = run(
            [job(tmp_path, n, host=server.host) for n in ("think", "chatty", "open")], ModelPool()
        )
    finally:
        server.stop()
    assert think["prompt"] == "portrait of a CEO, 85mm"
    assert chatty["prompt"] == "portrait of a nurse, soft light"
    assert isinstance(unclosed, BackendError) and "no usable prompt" in unclosed.message  # only thoughts


def test_llm_answers_structured_output_is_asked_for_and_read(tmp_path: Path) -> None:
    server = serve(tmp_path, "--reply", "Sure! Here is a prompt:\nportrait of a pilot")
    try:
        [info] = run([job(tmp_path, "pilot", host=server.host, max_length=120)], ModelPool())
        [body] = [r["body"] for r in server.requests() if r["path"] == "/api/generate"]
    finally:
        server.stop()
    assert info["prompt"] == "portrait of a pilot"
    assert body["think"] is False
    assert body["format"] == {
        "type": "object",
        "properties": {"prompt": {"type": "string", "maxLength": 120}},
        "required": ["prompt"],
    }
    assert body["options"]["num_predict"] == 120 // 3 + 32


def test_llm_answers_refusal_is_a_clear_error_for_that_character(tmp_path: Path) -> None:
    server = serve(tmp_path, "--reply-for", f"refuser={REFUSAL}", "--reply", "portrait of a chef")
    try:
        refused, fine = run([job(tmp_path, n, host=server.host) for n in ("refuser", "chef")], ModelPool())
    finally:
        server.stop()
    assert isinstance(refused, RefusalError)
    assert refused.message.startswith("characters.refuser: the model declined to write a portrait prompt (I'm sorry")
    assert "description" in refused.hint
    assert fine["prompt"] == "portrait of a chef"


def test_llm_answers_timeout_bounds_the_whole_request(tmp_path: Path) -> None:
    """The server answers a byte every 0.2 s: no single read waits long, but the whole answer takes ~20 s."""
    server = serve(tmp_path, "--trickle", "0.2", "--reply", "portrait " * 10)
    try:
        started = time.monotonic()
        [err] = run([job(tmp_path, "slow", host=server.host, timeout=1.5)], ModelPool())
        took = time.monotonic() - started
    finally:
        server.stop()
    assert isinstance(err, BackendError) and "did not answer within 1.5 s" in err.message, err
    assert took < 4


def test_llm_answers_ollama_host_is_honoured_without_llm_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(tmp_path, "--reply", "portrait of a baker")
    monkeypatch.setenv("OLLAMA_HOST", server.host.removeprefix("http://"))  # as `ollama` itself takes it
    try:
        [info] = run([job(tmp_path, "baker")], ModelPool())
    finally:
        server.stop()
    assert info["prompt"] == "portrait of a baker"


def test_llm_answers_max_length_cuts_at_a_clause_and_says_so(tmp_path: Path) -> None:
    assert shorten("portrait of a CEO, studio light, 85mm lens, sharp focus", 40) == "portrait of a CEO, studio light"
    assert shorten("a b c d e f g h i j k l m n o p q r s t, u", 20) == "a b c d e f g h i j"  # no clause: a word
    assert clean_prompt('{"prompt": "portrait of a CEO. Studio light"}', 25) == "portrait of a CEO"
    long = "portrait of a CEO, grey suit, studio light, 85mm lens, sharp focus, realistic skin texture"
    server = serve(tmp_path, "--reply", long)
    try:
        [info] = run([job(tmp_path, "ceo", host=server.host, max_length=50)], ModelPool())
    finally:
        server.stop()
    assert info["prompt"] == "portrait of a CEO, grey suit, studio light"
    [warning] = info["warnings"]
    assert "cut to 42 at a clause boundary (llm.max_length 50)" in warning and "85mm lens" in warning


def test_llm_answers_through_dhbatch_build(tmp_path: Path) -> None:
    """One build, four characters: a `<think>` answer (its prompt is cached clean), a refusal (that character's
    video fails with the reason, at its prompt step), a server that trickles past llm.timeout, an answer cut at a
    clause (a warning in the report), and $OLLAMA_HOST standing in for llm.host."""
    long = "portrait of a CEO, grey suit, studio light, 85mm lens, sharp focus"
    good = serve(
        tmp_path, "--ignore-format", "--reply-for", f"thinker={THINK}", "--reply-for", f"refuser={REFUSAL}",
        "--reply-for", f"talker={long}",
    )  # fmt: skip
    slow = serve(tmp_path, "--trickle", "0.2", "--reply", "portrait " * 10)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\n"
        "defaults:\n  llm: {engine: ollama}\n"
        "characters:\n"
        "  thinker: {description: a thinker}\n"
        "  refuser: {description: a refuser}\n"
        "  talker: {description: a talker, overrides: {llm: {max_length: 50}}}\n"
        f"  slow:\n    description: a slow one\n    overrides: {{llm: {{host: '{slow.host}', timeout: 1}}}}\n"
        "scripts:\n  hi: {text: hello}\n"
        "matrix: {characters: all, scripts: [hi]}\n"
    )
    env = {**os.environ, "OLLAMA_HOST": good.host, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "batch.cli", "build", str(manifest), "--json", "--build-dir", str(tmp_path / "b")],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False,
        )  # fmt: skip
    finally:
        good.stop()
        slow.stop()
    assert proc.returncode == 1, proc.stderr
    result = {v["id"]: v for v in json.loads(proc.stdout)["videos"]}
    assert "the model declined to write a portrait prompt" in result["refuser-hi"]["error"]
    assert "did not answer within 1 s" in result["slow-hi"]["error"]
    [prompt_step] = [s for s in result["thinker-hi"]["steps"] if s["stage"] == "prompt"]
    assert prompt_step["status"] == "ran" and prompt_step["info"]["prompt"] == "portrait of a CEO, 85mm"
    key = prompt_step["key"]
    cached = tmp_path / "b" / "cache" / "steps" / "prompt" / key[:2] / key / "prompt.txt"
    assert cached.read_text() == "portrait of a CEO, 85mm\n"
    [cut] = [s for s in result["talker-hi"]["steps"] if s["stage"] == "prompt"]
    assert cut["info"]["prompt"] == "portrait of a CEO, grey suit, studio light"
    assert "cut to 42 at a clause boundary (llm.max_length 50)" in cut["warnings"][0]


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (
            502,
            b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title><style>body{}</style></head>"
            b"<body><h1>502 Bad Gateway</h1><hr><center>nginx</center></body></html>",
            "failed (HTTP 502): an HTML page: 502 Bad Gateway",
        ),
        (200, b'{"model": "gemma:2b", "response": 3, "done": true}', "response: Input should be a valid string"),
    ],
    ids=["html-error-page", "validation-dump"],
)
def test_llm_answers_service_errors_are_summarised(tmp_path: Path, status: int, body: bytes, said: str) -> None:
    """A proxy's HTML error page or a client's validation dump becomes one short line, never pasted raw."""
    with canned_server(status, body) as url:
        [err] = run([job(tmp_path, "x", host=url)], ModelPool())
    assert isinstance(err, BackendError)
    assert said in err.message, err.message
    assert "<" not in err.message and "\n" not in err.message and "errors.pydantic.dev" not in err.message


def test_llm_answers_server_refusing_think_is_asked_again_without_it(tmp_path: Path) -> None:
    server = serve(tmp_path, "--no-think", "--reply", "portrait of a gardener")
    try:
        [info] = run([job(tmp_path, "gardener", host=server.host)], ModelPool())
        bodies = [r["body"] for r in server.requests() if r["path"] == "/api/generate"]
    finally:
        server.stop()
    assert info["prompt"] == "portrait of a gardener"
    assert [("think" in b) for b in bodies] == [True, False]


def test_llm_answers_structured_answer_cut_by_num_predict_keeps_its_prompt() -> None:
    assert clean_prompt('{"prompt": "portrait of a CEO, grey suit, studio \\"light', 200) == (
        'portrait of a CEO, grey suit, studio "light'
    )
    assert clean_prompt('{"prompt": "portrait of a CEO, grey su', 25) == "portrait of a CEO"
