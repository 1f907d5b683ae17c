"""Manifest loading: every schema or reference error is reported at once, located, and never as a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch.errors import ManifestError
from batch.manifest import load_manifest, section_defaults

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"

# One fixture per error, with the exact messages users see (paths relative to the fixtures folder).
EXPECTED = {
    "bad_engine.yaml": [
        "bad_engine.yaml:6:7: characters.ceo.voice.engine: 'gtss' is not one of gtts, hibari, piper; did you mean 'gtts'?"
    ],
    "unknown_refs.yaml": [
        "unknown_refs.yaml:8:5: videos[0].character: unknown character 'cfo' (known: ceo)",
        "unknown_refs.yaml:10:30: videos[1].script: unknown script 'bye' (known: hi)",
    ],
    "duplicate_ids.yaml": [
        "duplicate_ids.yaml:8:6: videos[1].id: duplicate video id 'v1' (first at duplicate_ids.yaml:7:5)"
    ],
    "missing_file.yaml": [
        "missing_file.yaml:4:5: characters.ceo.image: file 'portraits/nobody.png' does not exist (portraits/nobody.png)",
        "missing_file.yaml:7:5: scripts.hi.audio: file 'audio/missing.wav' does not exist (audio/missing.wav)",
    ],
    "escape_path.yaml": [
        "escape_path.yaml:4:5: characters.ceo.image: '../../../../etc/hostname' points outside the manifest's folder;"
        " keep files beside or below the manifest",
        "escape_path.yaml:6:5: characters.cto.image: absolute paths are not allowed; give a path relative to the"
        " manifest's folder",
    ],
    "cycle_a.yaml": [
        "inc/cycle_b.yaml:2:11: include[0]: include cycle: cycle_a.yaml → inc/cycle_b.yaml → cycle_a.yaml"
    ],
    "syntax_error.yaml": [
        "syntax_error.yaml:3:8: YAML error: the `{` here is never closed: add `}` where its value ends"
    ],
    "python_tag.yaml": [
        "python_tag.yaml:3:8: YAML error: could not determine a constructor for the tag"
        " 'tag:yaml.org,2002:python/object/apply:os.system'; only plain YAML data is allowed (no !! tags)"
    ],
    "alias_bomb.yaml": [
        "alias_bomb.yaml:8:6: the document expands to more than 200000 values through aliases; remove the repeated anchors"
    ],
    "alias_loop.yaml": ["alias_loop.yaml:2:7: an alias refers to a value that contains it; remove the loop"],
    "empty.yaml": ["empty.yaml:1:1: the file is empty; a manifest starts with `version: 1`"],
    "not_mapping.yaml": ["not_mapping.yaml:1:1: a manifest is a mapping that starts with `version: 1`"],
    "version2.yaml": ["version2.yaml:1:1: version: unsupported manifest version 2; this tool reads version 1"],
    "wrong_types.yaml": [
        "wrong_types.yaml:4:5: defaults.video.size: 300 is not one of 256, 512",
        "wrong_types.yaml:5:5: defaults.video.still: 'yes' is text; write true or false (without quotes)",
        "wrong_types.yaml:9:5: characters.ceo.seed: 'abc' is text; give a whole number",
    ],
    "unknown_key.yaml": [
        "unknown_key.yaml:2:1: charcters: unknown key 'charcters' (allowed: characters, defaults, include, matrix,"
        " scripts, vars, version, videos); did you mean 'characters'?",
        "unknown_key.yaml:5:3: scripts.hi: a script needs exactly one of text, text_file, audio or brief (given: text, audio)",
        "unknown_key.yaml:7:6: videos[0].id: '../v1' is not a valid id: use letters, digits, '-', '_' and '.' (no '..'),"
        " at most 64 characters",
    ],
    "matrix_bad_id.yaml": [
        "matrix_bad_id.yaml:6:41: matrix.id: makes the video id '../../ceo-hi', which is not valid: use letters, digits,"
        " '-', '_' and '.' (no '..'), at most 200 characters"
    ],
    "bad_keys_numbers.yaml": [
        "bad_keys_numbers.yaml:2:8: vars.1: key '1' is read as int, not text; quote it: '1'",
        "bad_keys_numbers.yaml:4:29: defaults.video.expression_scale: .nan is not a finite number; give a number",
        "bad_keys_numbers.yaml:6:35: characters.ceo.seed: .inf is not a finite number; give a number",
    ],
    "template_syntax.yaml": [
        "template_syntax.yaml:6:5: scripts.hi.text: line 1: template syntax error: unexpected end of template,"
        " expected 'end of print statement'."
    ],
}


@pytest.fixture
def in_fixtures(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(FIXTURES)
    return FIXTURES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_error_fixture_reports_exact_messages(name: str, in_fixtures: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(name)
    assert [str(p) for p in info.value.problems] == EXPECTED[name]


def test_manifest_python_tag_is_never_constructed(in_fixtures: Path, tmp_path: Path) -> None:
    marker = Path("/tmp/dhbatch-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(ManifestError):
        load_manifest("python_tag.yaml")
    assert not marker.exists()


def test_manifest_non_utf8_bytes_are_located(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"version: 1\ncharacters:\n  ceo: {description: caf\xe9}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(f)
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (3, 25)
    assert "not valid UTF-8 (byte 0xe9)" in problem.message


def test_manifest_symlink_escaping_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "face.png").symlink_to(outside)
    (folder / "m.yaml").write_text(
        "version: 1\ncharacters:\n  a: {image: face.png}\nscripts:\n  s: {text: hi}\n"
        "videos:\n  - {id: v, character: a, script: s}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(folder / "m.yaml")
    assert "points outside the manifest's folder" in str(info.value)


def test_manifest_preprocess_takes_every_sadtalker_mode_and_locates_a_wrong_one(tmp_path: Path) -> None:
    body = "version: 1\ncharacters:\n  a: {description: x}\nscripts:\n  s: {text: hi}\nvideos:\n"
    modes = ["crop", "extcrop", "resize", "full", "extfull"]
    (tmp_path / "ok.yaml").write_text(
        body
        + "".join(
            f"  - {{id: {m}, character: a, script: s, overrides: {{video: {{preprocess: {m}}}}}}}\n" for m in modes
        )
    )
    m = load_manifest(tmp_path / "ok.yaml")
    assert [m.settings(v)["video"]["preprocess"] for v in m.videos] == modes
    (tmp_path / "bad.yaml").write_text(
        body + "  - {id: v, character: a, script: s, overrides: {video: {preprocess: widecrop}}}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "bad.yaml")
    (problem,) = info.value.problems
    assert problem.line == 7 and "widecrop" in problem.message and "extfull" in problem.message, problem


def test_manifest_duplicate_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "d.yaml"
    f.write_text("version: 1\ncharacters:\n  a: {description: x}\n  a: {description: y}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(f)
    assert str(info.value.problems[0]).endswith("characters.a: duplicate key (first defined on line 3)")


def test_manifest_cli_prints_problems_without_traceback(in_fixtures: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batch.cli", "plan", "wrong_types.yaml"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: invalid manifest (3 problems):" in proc.stderr
    assert "wrong_types.yaml:9:5: characters.ceo.seed: 'abc' is text; give a whole number" in proc.stderr


def test_manifest_matrix_includes_and_settings_merge(tmp_path: Path) -> None:
    (tmp_path / "common.yaml").write_text(
        "version: 1\nvars: {company: Acme, tone: calm}\ndefaults:\n  video: {size: 512, still: true}\n"
        "characters:\n  ceo:\n    description: a CEO\n    voice: {rate: 1.2}\n    overrides: {video: {size: 256}}\n"
    )
    (tmp_path / "m.yaml").write_text(
        "version: 1\ninclude: [common.yaml]\nvars: {company: Initech}\ndefaults:\n  video: {still: false}\n"
        "characters:\n  cto: {description: a CTO}\n"
        "scripts:\n  a: {text: hi}\n  b: {text: bye}\n"
        "matrix: {characters: all, scripts: [a, b], id: '{script}-by-{character}'}\n"
        "videos:\n  - {id: special, character: cto, script: a, overrides: {video: {preprocess: full}}}\n"
    )
    m = load_manifest(tmp_path / "m.yaml")
    assert [v.id for v in m.videos] == ["special", "a-by-cto", "b-by-cto", "a-by-ceo", "b-by-ceo"]
    assert m.vars == {"company": "Initech", "tone": "calm"}  # the including file wins
    by_id = {v.id: v for v in m.videos}
    ceo = m.settings(by_id["a-by-ceo"])
    assert ceo["video"]["size"] == 256 and ceo["video"]["still"] is False and ceo["voice"]["rate"] == 1.2
    special = m.settings(by_id["special"])
    assert special["video"]["preprocess"] == "full" and special["video"]["size"] == 512
    assert special["voice"]["engine"] == section_defaults()["voice"]["engine"] == "piper"


def test_manifest_file_included_twice_is_read_once(tmp_path: Path) -> None:
    """Two team files that both include the shared cast (a diamond): its characters are defined once, no error."""
    (tmp_path / "cast.yaml").write_text("version: 1\ncharacters:\n  g: {description: a guide}\n")
    for team in ("team1", "team2"):
        (tmp_path / f"{team}.yaml").write_text(f"version: 1\ninclude: [cast.yaml]\nscripts:\n  {team}: {{text: hi}}\n")
    (tmp_path / "m.yaml").write_text(
        "version: 1\ninclude: [team1.yaml, team2.yaml]\nmatrix: {characters: all, scripts: all}\n"
    )
    m = load_manifest(tmp_path / "m.yaml")
    assert [v.id for v in m.videos] == ["g-team1", "g-team2"]
    assert sorted(p.name for p in m.files) == ["cast.yaml", "m.yaml", "team1.yaml", "team2.yaml"]


def test_manifest_matrix_makes_long_ids_and_no_id_ends_in_a_newline(tmp_path: Path) -> None:
    """Two 40-character ids make an 81-character matrix id (fine); an id with a trailing newline is refused."""
    char, script = "marketing-director-emea-region-lead-2026", "q3-product-launch-announcement-partners1"
    (tmp_path / "m.yaml").write_text(
        f"version: 1\ncharacters:\n  {char}: {{description: x}}\nscripts:\n  {script}: {{text: hi}}\n"
        "matrix: {characters: all, scripts: all}\n"
    )
    assert [v.id for v in load_manifest(tmp_path / "m.yaml").videos] == [f"{char}-{script}"]
    (tmp_path / "n.yaml").write_text(
        'version: 1\ncharacters:\n  "ceo\\n": {description: x}\nscripts:\n  s: {text: hi}\n'
        "matrix: {characters: all, scripts: all}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "n.yaml")
    assert "is not a valid id" in str(info.value.problems[0])


def test_manifest_settings_are_frozen(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "version: 1\ncharacters:\n  a: {description: x}\nscripts:\n  s: {text: hi}\nvideos:\n  - {id: v, character: a, script: s}\n"
    )
    m = load_manifest(tmp_path / "m.yaml")
    with pytest.raises(TypeError):
        m.settings(m.videos[0])["video"]["size"] = 512  # type: ignore[index]


def test_manifest_demo_is_valid(repo: Path) -> None:
    m = load_manifest(repo / "manifests" / "demo.yaml")
    assert len(m.characters) >= 2 and len(m.videos) >= 5
    assert any(s.audio is not None for s in m.scripts.values())


def test_manifest_schema_ships_inside_the_package() -> None:
    import batch

    assert (Path(batch.__file__).parent / "schema" / "manifest.schema.json").is_file()
    assert os.path.basename(batch.__file__) == "__init__.py"


def test_manifest_file_name_must_be_a_safe_output_folder(tmp_path: Path) -> None:
    f = tmp_path / "...yaml"
    f.write_text("version: 1\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(f)
    assert "cannot name an output folder under build/" in str(info.value)
