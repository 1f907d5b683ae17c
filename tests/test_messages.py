"""Messages people can act on: YAML and schema errors in the manifest's own terms, through `dhbatch validate`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batch.cli import main

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = ROOT / "manifests" / "portraits" / "astronaut.jpg"
TAIL = "scripts:\n  hi: {text: hello}\nvideos:\n  - {id: a, character: ceo, script: hi}\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # messages show paths relative to the current folder


def validate(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run `dhbatch validate` on a manifest made of `text`; its exit code and the problem lines it printed."""
    (tmp_path / "portraits").mkdir(exist_ok=True)
    shutil.copy(PORTRAIT, tmp_path / "portraits" / "astronaut.jpg")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(text, encoding="utf-8")
    code = main(["validate", str(manifest)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line.strip() for line in err.splitlines()[1:]]


YAML_CASES = {
    "tab": (
        "version: 1\ncharacters:\n\tceo: {image: portraits/astronaut.jpg}\n" + TAIL,
        "m.yaml:3:1: YAML error: a tab character: YAML indents with spaces only; replace the tab with spaces",
    ),
    "indentation": (
        "version: 1\ncharacters:\n  ceo:\n    image: portraits/astronaut.jpg\n   seed: 3\n" + TAIL,
        "m.yaml:5:4: YAML error: bad indentation: this line is indented by 3 spaces; the keys around it are indented "
        "by 4 (like `image` on line 4) or 2 (like `ceo` on line 3); line it up with the keys it belongs with",
    ),
    # PyYAML blames line 5 ("mapping values are not allowed"); the colon is missing on line 4.
    "missing colon": (
        "version: 1\ncharacters:\n  ceo:\n    portrait\n      image: portraits/astronaut.jpg\n" + TAIL,
        "m.yaml:4:5: YAML error: `portrait` has no colon, so YAML reads it and line 5 as one text; write "
        "`portrait:` if the lines under it belong to it",
    ),
    "over-indented": (
        "version: 1\ncharacters:\n  ceo:\n    image: portraits/astronaut.jpg\n      seed: 3\n" + TAIL,
        "m.yaml:5:7: YAML error: bad indentation: this line is indented more than line 4 (`image: ...`), so YAML "
        "reads it as the rest of that value; indent `seed` by 4 spaces like `image`",
    ),
    "unquoted jinja": (
        "version: 1\ncharacters:\n  ceo: {image: portraits/astronaut.jpg}\nscripts:\n  hi:\n"
        "    text: {{ greeting }} from us\nvideos:\n  - {id: a, character: ceo, script: hi}\n",
        "m.yaml:6:11: YAML error: a value that starts with `{{` must be quoted, or YAML reads it as a mapping; "
        'quote the whole value: text: "{{ greeting }} from us"',
    ),
    "unquoted jinja alone": (
        "version: 1\ncharacters:\n  ceo: {image: portraits/astronaut.jpg}\nscripts:\n  hi:\n"
        "    text: {{ greeting }}\nvideos:\n  - {id: a, character: ceo, script: hi}\n",
        "m.yaml:6:11: scripts.hi.text: a value that starts with `{{` must be quoted, or YAML reads it as a mapping; "
        'quote the whole value: "{{ ... }}"',
    ),
    "unquoted jinja in a flow mapping": (
        "version: 1\ncharacters:\n  ceo: {image: portraits/astronaut.jpg}\nscripts:\n"
        "  hi: {text: {{ greeting }} from us, vars: {greeting: Hi}}\nvideos:\n  - {id: a, character: ceo, script: hi}\n",
        "m.yaml:5:14: YAML error: a value that starts with `{{` must be quoted, or YAML reads it as a mapping; "
        'quote the whole value: text: "{{ greeting }} from us"',
    ),
    "colon in a value": (
        "version: 1\ncharacters:\n  ceo: {image: portraits/astronaut.jpg}\nscripts:\n  hi:\n"
        "    text: Note: we ship today\nvideos:\n  - {id: a, character: ceo, script: hi}\n",
        "m.yaml:6:5: YAML error: the value of `text` contains ': ', which YAML reads as another key; quote the whole "
        'value: text: "Note: we ship today"',
    ),
    "colon in a flow value": (
        "version: 1\ncharacters:\n  ceo: {image: portraits/astronaut.jpg}\nscripts:\n"
        "  hi: {text: Note: we ship today}\nvideos:\n  - {id: a, character: ceo, script: hi}\n",
        "m.yaml:5:8: YAML error: the value of `text` contains ': ', which YAML reads as another key; quote the whole "
        'value: text: "Note: we ship today"',
    ),
    "windows path in double quotes": (
        'version: 1\ncharacters:\n  ceo: {image: "C:\\Users\\me\\face.jpg"}\n' + TAIL,
        'm.yaml:3:16: YAML error: "C:\\Users\\me\\face.jpg" is a Windows path: a backslash inside double quotes '
        "starts an escape in YAML, and an absolute path is refused anyway; give the path relative to the "
        "manifest's folder, with forward slashes (e.g. portraits/face.jpg)",
    ),
    "windows path": (
        "version: 1\ncharacters:\n  ceo: {image: portraits\\astronaut.jpg}\n" + TAIL,
        "m.yaml:3:9: characters.ceo.image: portraits\\astronaut.jpg has backslashes (a Windows path); use forward "
        "slashes: portraits/astronaut.jpg",
    ),
    "windows absolute path": (
        "version: 1\ncharacters:\n  ceo: {image: 'C:\\Users\\me\\face.jpg'}\n" + TAIL,
        "m.yaml:3:9: characters.ceo.image: C:\\Users\\me\\face.jpg is an absolute Windows path, and absolute paths "
        "are not allowed; give a path relative to the manifest's folder, with forward slashes",
    ),
    # PyYAML reports these by character offset ("position 61"): shown as line:column instead.
    "control character": (
        'version: 1\ncharacters:\n  ceo: {image: portraits/astronaut.jpg, name: "a\x07b"}\n' + TAIL,
        "m.yaml:3:49: YAML error: character '\\x07' (U+0007) is not allowed in YAML (control characters are not "
        "allowed); remove it",
    ),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_messages_yaml_errors_in_the_manifests_terms(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = YAML_CASES[case]
    code, problems = validate(tmp_path, text, capsys)
    assert code == 2
    assert problems == [expected]


def test_messages_schema_errors_in_plain_words_once_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        "version: 1\n"
        "defaults:\n"
        "  video: {size: '512', renderer: sadtalk}\n"
        "  llm:\n"
        "characters:\n"
        "  ceo: {image: portraits/astronaut.jpg, seed: '3'}\n"
        "  cto:\n"
        "scripts:\n"
        "  hi: {text: hello}\n"
        "  ho:\n"
        "matrix: {characters: all, scripts: all, id: '{character}-{scripts}'}\n"
    )
    code, problems = validate(tmp_path, text, capsys)
    assert code == 2
    assert problems == [
        "m.yaml:3:11: defaults.video.size: '512' is quoted: write 512 without quotes (a number, not a string; one of "
        "256, 512)",
        "m.yaml:3:24: defaults.video.renderer: 'sadtalk' is not one of auto, puppet, sadtalker; did you mean "
        "'sadtalker'?",
        "m.yaml:4:3: defaults.llm: has no value; give a mapping (`key: value` lines)",
        "m.yaml:6:41: characters.ceo.seed: '3' is quoted: write 3 without quotes (a number, not a string)",
        "m.yaml:7:3: characters.cto: has no value; give a mapping (`key: value` lines)",
        "m.yaml:10:3: scripts.ho: has no value; give a mapping (`key: value` lines)",
    ]
    joined = "\n".join(problems)
    assert "None" not in joined and "valid under" not in joined


def test_messages_wrong_matrix_placeholder_is_named_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        "version: 1\ncharacters:\n  ceo: {image: portraits/astronaut.jpg}\n  cto: {image: portraits/astronaut.jpg}\n"
        "scripts:\n  hi: {text: hello}\n  ho: {text: hello}\n"
        "matrix: {characters: all, scripts: all, id: '{char}-{scripts}'}\n"
    )
    code, problems = validate(tmp_path, text, capsys)
    assert code == 2
    assert problems == [
        "m.yaml:8:41: matrix.id: unknown placeholders {char}, {scripts} in the id pattern '{char}-{scripts}'; use "
        "{character} and {script}"
    ]


def test_messages_cli_subprocess_gives_line_and_column_not_an_offset(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_bytes(b'version: 1\ncharacters:\n  ceo: {description: "a\x01"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "batch.cli", "validate", "m.yaml"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "m.yaml:3:24: YAML error: character '\\x01' (U+0001) is not allowed" in proc.stderr
    assert "position" not in proc.stderr
