"""Contact sheets of the puppet's face: a blink and a mouth opening, zoomed, on the demo's two portraits.

Run: `python bench/contact_sheets.py OUT_DIR [--size 512]`. Writes OUT_DIR/blink_<portrait>_<size>.png (the eyes
through a blink: open, closing, closed, opening) and OUT_DIR/mouth_<portrait>_<size>.png (the mouth from closed to
wide open, rounded and spread), each with the whole face beside it, for looking at (Grace Hopper wears glasses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PORTRAITS = {"astronaut": "astronaut.jpg", "grace": "grace_hopper.jpg"}
BLINK = [0.0, 0.3, 0.6, 0.85, 1.0, 0.65, 0.3, 0.1]
MOUTH = [(0.0, 0.0), (0.2, 0.0), (0.4, 0.0), (0.6, 0.0), (0.8, 0.0), (1.0, 0.0), (0.6, -0.9), (0.6, 0.8)]


def rig_for(name: str, size: int):  # noqa: ANN201 - bench helper
    from renderer.faces import detect_face, load_image
    from renderer.puppet.pipeline import frame_face
    from renderer.puppet.rig import FaceRig

    image = load_image(REPO / "manifests" / "portraits" / PORTRAITS[name])
    framing = frame_face(image, detect_face(image, name).landmarks, size, "crop")
    return FaceRig(framing.image, framing.landmarks), framing.landmarks


def crop(frame: np.ndarray, centre: np.ndarray, half_w: float, half_h: float, scale: int) -> np.ndarray:
    from PIL import Image

    x0, y0 = int(centre[0] - half_w), int(centre[1] - half_h)
    part = frame[max(y0, 0) : int(centre[1] + half_h), max(x0, 0) : int(centre[0] + half_w)]
    return np.asarray(Image.fromarray(part).resize((part.shape[1] * scale, part.shape[0] * scale), Image.NEAREST))


def sheet(tiles: list[np.ndarray], whole: np.ndarray, labels: list[str]) -> np.ndarray:
    from PIL import Image, ImageDraw

    tile_h, tile_w = tiles[0].shape[:2]
    cols = 4
    rows = -(-len(tiles) // cols)
    thumb = np.asarray(Image.fromarray(whole).resize((rows * (tile_h + 14), rows * (tile_h + 14))))
    out = Image.new("RGB", (cols * tile_w + thumb.shape[1] + 4, rows * (tile_h + 14)), "white")
    draw = ImageDraw.Draw(out)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x, y = (i % cols) * tile_w, (i // cols) * (tile_h + 14)
        out.paste(Image.fromarray(tile), (x, y + 14))
        draw.text((x + 2, y + 1), label, fill="black")
    out.paste(Image.fromarray(thumb), (cols * tile_w + 4, 0))
    return np.asarray(out)


def main() -> None:
    from PIL import Image

    from renderer.puppet.rig import Pose

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zoom = 2 if args.size <= 256 else 1
    for name in PORTRAITS:
        rig, lm = rig_for(name, args.size)
        eyes = lm[36:48].mean(axis=0)
        half_w = 0.62 * np.ptp(lm[36:48, 0])
        frames = [rig.render(Pose(blink=b))[0] for b in BLINK]
        tiles = [crop(f, eyes, half_w, 0.35 * half_w, zoom) for f in frames]
        out = sheet(tiles, frames[4], [f"blink {b:.2f}" for b in BLINK])
        Image.fromarray(out).save(args.out / f"blink_{name}_{args.size}.png")
        mouth = lm[48:68].mean(axis=0)
        half_w = 0.9 * np.ptp(lm[48:68, 0])
        frames = [rig.render(Pose(mouth_open=o, mouth_width=w))[0] for o, w in MOUTH]
        tiles = [crop(f, mouth + [0, 0.2 * half_w], half_w, 0.75 * half_w, zoom) for f in frames]
        out = sheet(tiles, frames[5], [f"open {o:.1f} width {w:+.1f}" for o, w in MOUTH])
        Image.fromarray(out).save(args.out / f"mouth_{name}_{args.size}.png")
        print(f"wrote {args.out}/blink_{name}_{args.size}.png and mouth_{name}_{args.size}.png")


if __name__ == "__main__":
    main()
