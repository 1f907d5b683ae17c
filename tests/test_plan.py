"""Edit-and-replan: exactly the steps whose inputs changed run again, each with the reason users would expect."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from batch.hashing import step_key
from tests._fake_stages import make_registry
from tests._project import build, plan, stale_steps, write_project


@pytest.fixture
def built(tmp_path: Path) -> Path:
    write_project(tmp_path)
    result = build(tmp_path, make_registry())
    assert [v.status for v in result.videos] == ["built"] * 5
    return tmp_path


def test_plan_first_run_is_new_with_expected_steps(tmp_path: Path) -> None:
    write_project(tmp_path)
    p, _ = plan(tmp_path)
    steps = {v.video.id: [d.stage for d in v.decisions] for v in p.videos}
    assert steps["ceo-hello"] == ["prompt", "image", "voice", "animate", "mux"]
    assert steps["cto-hello"] == ["voice", "animate", "mux"]  # a given portrait skips prompt and image
    assert steps["cto-recorded"] == ["audio", "animate", "mux"]  # a given audio file skips voice
    assert all(d.reason == "new" for v in p.videos for d in v.decisions)
    assert p.stale


def test_plan_nothing_changed_all_cached(built: Path) -> None:
    p, _ = plan(built)
    assert stale_steps(p) == {}
    assert not p.stale


def test_plan_script_text_edit_reruns_only_its_videos(built: Path) -> None:
    write_project(built, hello="Hello, I am the new boss.")
    p, _ = plan(built)
    reason = {"voice": "script text changed", "animate": "audio changed", "mux": "audio changed; video changed"}
    assert stale_steps(p) == {"ceo-hello": reason, "cto-hello": reason}


def test_plan_description_edit_reruns_prompt_image_and_downstream(built: Path) -> None:
    write_project(built, ceo="a calm CEO in his sixties")
    p, _ = plan(built)
    expected = {
        "prompt": "character description or prompt template changed",
        "image": "prompt changed",
        "animate": "portrait changed",
        "mux": "video changed",
    }
    assert stale_steps(p) == {"ceo-hello": expected, "ceo-bye": expected}


def test_plan_default_setting_change_reruns_steps_that_use_it(built: Path) -> None:
    write_project(built, rate=1.5)
    p, _ = plan(built)
    stale = stale_steps(p)
    assert set(stale) == {"ceo-hello", "ceo-bye", "cto-hello", "cto-bye"}  # cto-recorded uses no synthesis
    assert all(s["voice"] == "voice.rate 1.0 → 1.5" for s in stale.values())
    assert all(set(s) == {"voice", "animate", "mux"} for s in stale.values())


def test_plan_cosmetic_setting_change_reruns_nothing(built: Path) -> None:
    write_project(built, batch=32)
    p, _ = plan(built)
    assert stale_steps(p) == {}


def test_plan_engine_change_names_old_and_new(built: Path) -> None:
    path = built / "m.yaml"
    path.write_text(path.read_text().replace("engine: piper", "engine: gtts"))
    p, _ = plan(built)
    assert stale_steps(p)["cto-bye"]["voice"] == "voice.engine piper → gtts"


def test_plan_deleted_cache_entry_is_output_missing(built: Path) -> None:
    p, cache = plan(built)
    mux = next(d for d in p.videos[0].decisions if d.stage == "mux")
    shutil.rmtree(cache.entry("mux", mux.key))
    p, _ = plan(built)
    assert stale_steps(p) == {p.videos[0].video.id: {"mux": "output missing"}}


def test_plan_portrait_file_change_reruns_its_videos(built: Path) -> None:
    (built / "face.png").write_bytes(b"another portrait")
    p, _ = plan(built)
    assert set(stale_steps(p)) == {"cto-hello", "cto-bye", "cto-recorded"}
    assert stale_steps(p)["cto-bye"]["animate"] == "portrait changed"


def test_plan_force_stage_reruns_that_stage(built: Path) -> None:
    p, _ = plan(built, force=("mux",))
    stale = stale_steps(p)
    assert len(stale) == 5 and all(s == {"mux": "forced (--force)"} for s in stale.values())


def test_plan_force_stage_reruns_what_is_made_from_it(built: Path) -> None:
    """--force voice reruns the voice steps and the animate and mux steps made from them, not the recorded
    audio's or the portraits' steps; the build runs exactly those."""
    p, _ = plan(built, force=("voice",))
    stale = stale_steps(p)
    assert set(stale) == {"ceo-hello", "ceo-bye", "cto-hello", "cto-bye"}
    for steps in stale.values():
        assert steps == {
            "voice": "forced (--force)",
            "animate": "forced (--force upstream)",
            "mux": "forced (--force upstream)",
        }
    log = built / "forced.log"
    build(built, make_registry(log=log), force=("voice",))
    ran = [line.split()[:2] for line in log.read_text().splitlines()]
    planned = {(d.stage, d.key) for v in p.videos for d in v.decisions if not d.cached}
    assert sorted(map(tuple, ran)) == sorted(planned)


def test_plan_keys_are_pinned(tmp_path: Path) -> None:
    """Keys that depend on nothing installed are pinned: an accidental change of derivation fails here."""
    write_project(tmp_path)
    p, _ = plan(tmp_path)
    by_id = {v.video.id: {s.stage: s.key for s in v.steps} for v in p.videos}
    assert by_id["cto-recorded"]["audio"] == "deb8de6b1dbe472723cc4e6f4c0b732f88a3b1eef5714522b4fc5f506a5d9447"
    assert step_key("mux", {"version": 1, "settings": {}, "inputs": {"video": "a", "audio": "b"}, "weights": {}}) == (
        "6e42c59520df0268d159407bdd00e4bdc6dc63033736f28cd654f825a66aea0a"
    )


def test_plan_prompt_template_missing_variable_names_template_and_line(tmp_path: Path) -> None:
    from batch.errors import ManifestError

    write_project(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "image_prompt.j2").write_text("A portrait of {{ description }}\nin {{ style }} style\n")
    with pytest.raises(ManifestError) as info:
        plan(tmp_path)
    assert "image_prompt.j2: line 2: 'style' is undefined" in str(info.value)


def test_plan_template_sandbox_blocks_attribute_escapes(tmp_path: Path) -> None:
    from batch.errors import ManifestError

    write_project(tmp_path, hello="{{ character.__class__.__mro__ }}")
    with pytest.raises(ManifestError) as info:
        plan(tmp_path)
    assert "scripts.hello.text" in str(info.value)


def test_plan_named_weights_are_keyed_on_what_the_stage_loads(tmp_path: Path) -> None:
    """voice/llm/image model settings: one rule (`named_weights`) for the key and the stage; the key holds the
    digest of exactly the loaded file or folder and keeps the manifest's spelling of the setting."""
    from batch.stages import named_weights
    from renderer.llm import _local_paths
    from renderer.portrait import resolve_model
    from renderer.voice import resolve_piper_model

    ck = tmp_path / "checkpoints"
    voice = ck / "piper" / "team" / "anna.onnx"
    voice.parent.mkdir(parents=True)
    voice.write_bytes(b"onnx")
    voice.with_name("anna.onnx.json").write_text("{}")
    (ck / "llm" / "tiny").mkdir(parents=True)
    (ck / "llm" / "tiny" / "config.json").write_text("{}")
    (ck / "sd").mkdir()

    assert named_weights("voice", "team/anna", ck).path == voice == resolve_piper_model("team/anna", ck)[0]
    assert named_weights("voice", "piper/team/anna.onnx", ck).path == voice
    assert named_weights("voice", "en_US-joe-medium", ck).kind == "package"
    assert named_weights("llm", None, ck).kind == "package"
    assert named_weights("llm", "m.gguf", ck).path == ck / "m.gguf"
    llm = named_weights("llm", "llm/tiny", ck)
    assert (llm.kind, llm.path) == ("folder", ck / "llm" / "tiny") and _local_paths("llm/tiny", ck, "x")[1] == llm.path
    sd = named_weights("image", "sd", ck)
    assert (sd.kind, sd.path) == ("folder", ck / "sd") and resolve_model("sd", ck) == (str(ck / "sd"), ck / "sd")
    assert named_weights("image", "stabilityai/stable-diffusion-2-1-base", ck).kind == "hub"

    write_project(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text(path.read_text().replace("engine: piper,", "engine: piper, model: team/anna,"))

    def voice_step():
        p, _ = plan(tmp_path)
        return next(s for s in p.videos[1].steps if s.stage == "voice")

    first = voice_step()
    assert first.fingerprint["settings"]["model"] == "team/anna"  # not where the project is checked out
    assert set(first.fingerprint["weights"]) == {"piper", "config"}
    assert "missing" not in str(first.fingerprint["weights"])
    voice.with_name("anna.onnx.json").write_text('{"audio": {"sample_rate": 16000}}')
    assert voice_step().key != first.key  # the voice's config is part of it


def test_plan_voice_model_defaults_to_the_engines_bundled_voice(built: Path) -> None:
    """An unset voice.model is the engine's bundled voice: spelling it out changes no key; switching to Hibari
    reruns the voices with the reason, keyed on the hibari-tts package."""
    path = built / "m.yaml"
    text = path.read_text()
    path.write_text(text.replace("engine: piper,", "engine: piper, model: en_US-joe-medium,"))
    assert not plan(built)[0].stale
    path.write_text(text.replace("engine: piper,", "engine: hibari,"))
    p, _ = plan(built)
    voice = next(s for s in p.videos[1].steps if s.stage == "voice")
    assert voice.fingerprint["settings"]["model"] == "heart"
    assert voice.fingerprint["weights"]["hibari"].startswith("hibari-tts==")
    assert {s["voice"] for s in stale_steps(p).values() if "voice" in s} == {"voice.engine piper → hibari"}


def test_plan_puppet_version_is_part_of_its_animate_keys(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The puppet draws differently from one version to the next: its animate steps rebuild, nothing else."""
    from renderer.puppet import pipeline

    monkeypatch.setattr(pipeline, "VERSION", pipeline.VERSION + 1)
    p, _ = plan(built)
    assert {stage for steps in stale_steps(p).values() for stage in steps} == {"animate", "mux"}


def test_plan_auto_renderer_follows_checkpoints_and_explains_the_switch(built: Path) -> None:
    from batch.stages import sadtalker_files

    path = built / "m.yaml"
    path.write_text(path.read_text().replace("renderer: puppet", "renderer: auto"))
    p, _ = plan(built)
    assert {v.renderer for v in p.videos} == {"puppet"} and not p.stale  # auto resolved to puppet: same keys
    for name in sadtalker_files(256, "crop"):
        (built / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
        (built / "checkpoints" / name).write_bytes(b"weights")
    p, _ = plan(built)
    assert {v.renderer for v in p.videos} == {"sadtalker"}
    assert all(s["animate"] == "video.renderer puppet → sadtalker" for s in stale_steps(p).values())


def test_plan_empty_script_text_fails_validate_and_only_its_videos_in_a_build(tmp_path: Path) -> None:
    """validate (a pull-request check) reports a script that renders empty, located; a build still makes the other
    videos (the empty ones fail at their voice step)."""
    from batch.manifest import load_manifest
    from batch.plan import template_problems

    write_project(tmp_path, hello="{% if false %}never{% endif %}  ")
    problems = [str(p).split("m.yaml:", 1)[1] for p in template_problems(load_manifest(tmp_path / "m.yaml"))]
    assert problems == [
        f"16:5: scripts.hello.text: the text is empty for video {video} — write what the character says, or give an"
        " audio file"
        for video in ("ceo-hello", "cto-hello")
    ]
    p, _ = plan(tmp_path)  # not a plan error: the build goes on (tests/test_e2e.py: the real voice stage fails it)
    assert len(p.videos) == 5


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 10**10 }}",
        "{{ '{:>1500000000}'.format('x') }}",
        "{{ 'x'|center(1500000000) }}",
        "{{ 'x'.rjust(1500000000) }}",
        "{{ '%1500000000d' % 1 }}",
        "{{ '%1500000000s'|format('a') }}",
        "{{ 'x'|indent(width=1500000000, first=true) }}",
        "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}",
        "{% set a = 10**1000 %}{% set a = a * a %}{% set a = a * a %}{% set a = a * a %}{{ a }}",
        "{{ '%*d' % (2000000, 1) }}",
        "{{ '%*s'|format(2000000, 'a') }}",
        "{{ '{:{w}}'.format('x', w=2000000) }}",
        "{{ '{:>{}}'.format('x', 2000000) }}",
        "{{ 'a\tb'.expandtabs(tabsize=2000000) }}",
        "{{ ('x\n' * 3000)|indent(3000) }}",
        "{{ 3**4096 }}",
        "{{ (' ' * 1000000)|wordwrap(1) }}",
    ],
)
def test_templates_refuse_blow_ups_quickly(source: str) -> None:
    """The usual ways a template blows up (huge repeats, widths, numbers, texts) are refused without trying."""
    import time

    from batch.templates import TemplateError, render

    started = time.perf_counter()
    with pytest.raises(TemplateError, match="unsafe template operation"):
        render(source, "scripts.s.text", {})
    assert time.perf_counter() - started < 0.5


def test_templates_ordinary_formatting_still_works() -> None:
    from batch.templates import render

    source = "{{ '%s-%03d' % ('a', 7) }} {{ '{:>4}'.format('x') }} {{ 'ab'|center(6) }} {{ 2**3000 > 1 }} {{ 'x' * 3 }}"
    assert render(source, "t", {}) == "a-007    x   ab   True xxx"
    # Long numbers in the text are not format widths.
    source = "{{ 'Call 0800123456, %s' % 'Ann' }} {{ 'Order 20261126: {}'.format(7) }} {{ '{:>{w}}'.format('x', w=3) }}"
    assert render(source, "t", {}) == "Call 0800123456, Ann Order 20261126: 7   x"
