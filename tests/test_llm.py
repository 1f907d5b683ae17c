"""Stage "prompt" (renderer/llm.py): Ollama through a real local HTTP server, the bundled local model, cleaning."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from renderer.base import BackendError, BadInputError, ModelPool, StepJob
from renderer.llm import clean_prompt, run
from tests._http_util import canned_server
from tests._ollama import FakeOllama

ROOT = Path(__file__).resolve().parents[1]
REQUEST = "Write one Stable Diffusion prompt for this photograph: a CEO. Answer with the prompt only."


@pytest.fixture
def ollama_server(tmp_path: Path) -> Iterator[FakeOllama]:
    server = FakeOllama(
        tmp_path,
        "--model",
        "gemma:2b",
        "--reply",
        '\n  Prompt: "passport   photo of a CEO,\tseed {seed}, temperature {temperature}"  \nSecond line',
    )
    yield server
    server.stop()


def make_job(tmp_path: Path, name: str = "job", text: str = REQUEST, seed: int = 42, **settings: object) -> StepJob:
    out = tmp_path / name
    out.mkdir()
    resolved = {
        "engine": "ollama",
        "model": None,
        "host": "http://127.0.0.1:11434",
        "temperature": 0.7,
        "max_length": 200,
        "timeout": 60,
    }
    resolved.update(settings)
    return StepJob(
        stage="prompt",
        key=name,
        settings=resolved,
        inputs={},
        out_dir=out,
        text=text,
        seed=seed,
        checkpoints=tmp_path / "checkpoints",
        label=f"characters.{name}",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- cleaning -----------------------------------------------------------------------------------------------------


def test_clean_prompt_keeps_first_nonempty_line_without_label_or_quotes() -> None:
    answer = '\n\n  Prompt: "passport photo,   front-facing\theadshot"\nHere is another idea: ...'
    assert clean_prompt(answer, 200) == "passport photo, front-facing headshot"


def test_clean_prompt_strips_nested_labels_bullets_and_typographic_quotes() -> None:
    assert clean_prompt("- Image prompt: “a CEO, 85mm”", 200) == "a CEO, 85mm"
    assert clean_prompt("1. 'Prompt: portrait of a nurse'", 200) == "portrait of a nurse"


def test_clean_prompt_drops_a_chat_models_lead_in() -> None:
    """Chat models (gemma:2b) often introduce the answer: the lead-in is not the prompt."""
    answer = "Sure! Here is a prompt for Stable Diffusion:\n\nportrait photo of a CEO, 85mm"
    assert clean_prompt(answer, 200) == "portrait photo of a CEO, 85mm"
    assert clean_prompt("Here's a Stable Diffusion prompt: \"portrait of a CEO", 200) == "portrait of a CEO"
    assert clean_prompt("portrait of a woman: studio light", 200) == "portrait of a woman: studio light"
    for kept in ("Here is a woman in the rain, ratio 16:9", "Here's a portrait of a CEO: confident, studio light"):
        assert clean_prompt(kept, 200) == kept  # a lead-in names the prompt; these are the prompt


def test_clean_prompt_cuts_at_a_word_boundary() -> None:
    text = "passport photo of a confident executive, neutral expression"
    cut = clean_prompt(text, 30)
    assert len(cut) <= 30
    assert cut == "passport photo of a confident"
    assert clean_prompt("x" * 50, 10) == "x" * 10  # one long word: a hard cut


def test_clean_prompt_returns_empty_for_blank_answers() -> None:
    assert clean_prompt('  \n "" \n Prompt:  ', 200) == ""


# --- ollama through a real HTTP server ----------------------------------------------------------------------------


def test_llm_ollama_sends_seed_temperature_and_writes_clean_prompt(tmp_path: Path, ollama_server: FakeOllama) -> None:
    job = make_job(tmp_path, host=ollama_server.host, temperature=0.3, seed=1234)
    [info] = run([job], ModelPool())

    assert isinstance(info, dict), info
    expected = "passport photo of a CEO, seed 1234, temperature 0.3"
    assert info == {"prompt": expected, "engine": "ollama", "model": "gemma:2b"}
    assert (job.out_dir / "prompt.txt").read_text(encoding="utf-8") == expected + "\n"
    generate = [r for r in ollama_server.requests() if r["path"] == "/api/generate"]
    assert len(generate) == 1
    body = generate[0]["body"]
    assert body["model"] == "gemma:2b"
    assert body["prompt"] == REQUEST
    assert body["options"] == {"seed": 1234, "temperature": 0.3, "num_predict": 200 // 3 + 32}
    assert body["think"] is False and body["stream"] is False
    assert body["format"]["properties"]["prompt"] == {"type": "string", "maxLength": 200}
    assert body["stream"] is False


def test_llm_ollama_missing_model_hints_ollama_pull(tmp_path: Path, ollama_server: FakeOllama) -> None:
    job = make_job(tmp_path, host=ollama_server.host, model="llama9:70b")
    [err] = run([job], ModelPool())

    assert isinstance(err, BackendError)
    assert "llama9:70b" in err.message and "not found" in err.message
    assert err.hint == "run `ollama pull llama9:70b`"
    assert not (job.out_dir / "prompt.txt").exists()


def test_llm_ollama_unreachable_server_hints_ollama_serve(tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    [err] = run([make_job(tmp_path, host=host)], ModelPool())

    assert isinstance(err, BackendError)
    assert host in err.message and "characters.job" in err.message
    assert "ollama serve" in err.hint
    assert time.monotonic() - started < 10


def test_llm_ollama_slow_server_times_out_with_hint(tmp_path: Path) -> None:
    server = FakeOllama(tmp_path, "--model", "gemma:2b", "--delay", "3")
    try:
        [err] = run([make_job(tmp_path, host=server.host, timeout=0.5)], ModelPool())
    finally:
        server.stop()
    assert isinstance(err, BackendError)
    assert "did not answer within 0.5 s" in err.message
    assert "llm.timeout" in err.hint


def test_llm_ollama_empty_answer_is_a_backend_error(tmp_path: Path) -> None:
    server = FakeOllama(tmp_path, "--model", "gemma:2b", "--reply", '  \n "" \n')
    try:
        [err] = run([make_job(tmp_path, host=server.host)], ModelPool())
    finally:
        server.stop()
    assert isinstance(err, BackendError)
    assert "no usable prompt" in err.message


def test_llm_one_failing_job_does_not_stop_the_others(tmp_path: Path, ollama_server: FakeOllama) -> None:
    bad = make_job(tmp_path, "bad", host=ollama_server.host, model="missing:1b")
    good = make_job(tmp_path, "good", host=ollama_server.host, seed=7)
    results = run([bad, good], ModelPool())

    assert isinstance(results[0], BackendError)
    assert isinstance(results[1], dict) and "seed 7" in results[1]["prompt"]


def test_ollama_server_streams_the_same_text_when_asked(ollama_server: FakeOllama) -> None:
    """The fake server answers streaming requests as Ollama does, so it stays faithful if the stage streams."""
    import ollama

    client = ollama.Client(host=ollama_server.host, timeout=10)
    whole = client.generate(model="gemma:2b", prompt="x", options={"seed": 3}).response
    parts = [
        chunk.response for chunk in client.generate(model="gemma:2b", prompt="x", options={"seed": 3}, stream=True)
    ]
    assert len(parts) > 2
    assert "".join(parts) == whole
    assert [m.model for m in client.list().models] == ["gemma:2b"]


# --- none engine, settings ----------------------------------------------------------------------------------------


def test_llm_none_engine_uses_the_request_as_the_prompt(tmp_path: Path) -> None:
    job = make_job(tmp_path, engine="none", text="\nphoto,  front-facing passport-style headshot of a CEO\n")
    [info] = run([job], ModelPool())

    assert info == {"prompt": "photo, front-facing passport-style headshot of a CEO", "engine": "none", "model": None}
    assert (job.out_dir / "prompt.txt").read_text(encoding="utf-8").strip() == info["prompt"]


def test_llm_unknown_engine_is_a_bad_input(tmp_path: Path) -> None:
    [err] = run([make_job(tmp_path, engine="gpt")], ModelPool())
    assert isinstance(err, BadInputError)
    assert "llm.engine 'gpt'" in err.message


def test_fewshot_template_ends_with_an_open_prompt_line() -> None:
    from batch.templates import render

    source = (ROOT / "prompts" / "image_prompt_fewshot.j2").read_text(encoding="utf-8")
    text = render(source, "image_prompt_fewshot.j2", {"description": "  a CEO\nin her fifties "})
    assert text.rstrip().endswith("Description: a CEO in her fifties\nPrompt:")
    examples = [line for line in text.splitlines() if line.startswith("Prompt: ")]
    assert len(examples) >= 2 and all(len(line) < 250 for line in examples)


# --- local engine: the bundled Gemma 3 270M, for real -------------------------------------------------------------


@pytest.mark.slow
def test_llm_local_engine_converts_once_and_is_seeded(tmp_path: Path) -> None:
    """Real model: first run assembles + converts the GGUF, a fresh pool reloads the converted copy, same seed → same
    text. Conversion ~30 s, then two ~41-token completions: 63–119 s measured on 2 cores shared with other jobs
    (deselect with -m "not slow")."""
    from batch.templates import render

    source = (ROOT / "prompts" / "image_prompt_fewshot.j2").read_text(encoding="utf-8")
    request = render(source, "image_prompt_fewshot.j2", {"description": "a confident CEO in her fifties"})
    first = make_job(tmp_path, "first", text=request, engine="local", seed=3)
    [info] = run([first], ModelPool())

    assert isinstance(info, dict), info
    prompt = info["prompt"]
    assert info["engine"] == "local"
    assert 20 < len(prompt) <= 200 and "\n" not in prompt
    assert "CEO" in prompt  # the few-shot pattern copies the description
    converted = tmp_path / "checkpoints" / "gemma3-270m" / "transformers"
    assert (converted / "conversion.json").is_file()
    assert any(converted.glob("*.safetensors"))

    stamp = (converted / "conversion.json").stat()
    again = make_job(tmp_path, "again", text=request, engine="local", seed=3)
    [info_again] = run([again], ModelPool())
    assert isinstance(info_again, dict), info_again
    assert info_again["prompt"] == prompt
    after = (converted / "conversion.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)  # not converted again


def test_llm_bundled_gguf_is_assembled_again_for_another_package_version(tmp_path: Path) -> None:
    """The prompt keys follow the bundled package's version, so the assembled GGUF (and, through its modification
    time, the converted copy) must follow it too: a file assembled by another version is assembled again."""
    from renderer.llm import _conversion_stamp, _ensure_bundled, _local_paths

    gguf, _, _ = _local_paths(None, tmp_path, "x")
    _ensure_bundled(gguf)
    version_file = gguf.with_name(gguf.name + ".version")
    first, stamp = gguf.stat(), _conversion_stamp(gguf)
    assert version_file.read_text().strip() and first.st_size > 200_000_000

    _ensure_bundled(gguf)  # same version: kept
    assert gguf.stat().st_mtime_ns == first.st_mtime_ns
    recorded = version_file.read_text()
    version_file.unlink()  # assembled before version files existed: taken as current, and recorded
    _ensure_bundled(gguf)
    assert gguf.stat().st_mtime_ns == first.st_mtime_ns and version_file.read_text() == recorded

    version_file.write_text("0.0.0\n")  # as left by an older package
    _ensure_bundled(gguf)
    assert gguf.stat().st_mtime_ns != first.st_mtime_ns and version_file.read_text().strip() != "0.0.0"
    assert _conversion_stamp(gguf) != stamp  # so the converted folder is made again


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"<html>a web server, not Ollama</html>"),
        (200, b'{"response": "a", "done": false}\n{"response": "b", "done": true}\n'),  # streamed anyway
        (200, b"null"),
        (404, b"404 page not found"),
    ],
    ids=["html", "ndjson", "null", "plain-404"],
)
def test_llm_host_that_is_not_ollama_is_a_backend_error(tmp_path: Path, status: int, body: bytes) -> None:
    """llm.host pointing at something else: a BackendError saying so (not an internal error), and a 404 without a
    model message does not tell the user to pull a model."""
    with canned_server(status, body) as url:
        [err] = run([make_job(tmp_path, host=url)], ModelPool())
    assert isinstance(err, BackendError), err
    assert "characters.job" in err.message and "internal error" not in err.message
    assert "ollama pull" not in str(err)


def test_llm_host_that_is_not_a_url_is_bad_input(tmp_path: Path) -> None:
    [err] = run([make_job(tmp_path, host="http://[::1")], ModelPool())
    assert isinstance(err, BadInputError) and "llm.host" in err.message
