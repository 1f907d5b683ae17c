"""Paste rendered face frames back into the original portrait (`preprocess: full`, SPEC §8.3).

Upstream resizes each frame to the face rectangle and blends it in with OpenCV's Poisson `seamlessClone`
(NORMAL_CLONE, full rectangular mask). This module solves the same Poisson problem without OpenCV: inside the
rectangle the result keeps the frame's gradients (Δf = Δframe) while its one-pixel border takes the portrait's
pixels (f = portrait), so colour and brightness steps at the seam are spread smoothly over the face region.

Writing f = frame + h, h is harmonic inside with h = portrait − frame on the border; the discrete Dirichlet
Laplacian of a rectangle is diagonal in the type-I discrete sine basis, so h costs two DST-I transforms per frame
(scipy.fft), exact up to float rounding. Differences from upstream, on purpose: frames come straight from the
renderer (upstream pastes H.264-decoded frames), and OpenCV's own solver details (it erodes the mask border and
iterates in float32) are not copied, so pixels near the seam differ by a few levels.
"""

from __future__ import annotations

import numpy as np


class PasteBack:
    """Blends frames into one portrait at a fixed rectangle; build once per video, call once per frame.

    paste = PasteBack(portrait_rgb, crop_info.paste_box)
    full_frame = paste(face_frame_rgb)      # H×W×3 uint8, same size as the portrait
    """

    def __init__(self, image: np.ndarray, box: tuple[int, int, int, int]) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 portrait, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        x1, y1, x2, y2 = (int(v) for v in box)
        x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
        y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise ValueError(f"paste rectangle {box} is empty inside the {width}×{height} portrait")
        self.image = image
        self.box = (x1, y1, x2, y2)
        self.size = (x2 - x1, y2 - y1)
        self._target = image[y1:y2, x1:x2].astype(np.float64)
        rows, cols = y2 - y1 - 2, x2 - x1 - 2  # interior (unknowns) of the rectangle
        self._eigen = None
        if rows > 0 and cols > 0:
            ky = 2.0 - 2.0 * np.cos(np.pi * np.arange(1, rows + 1) / (rows + 1))
            kx = 2.0 - 2.0 * np.cos(np.pi * np.arange(1, cols + 1) / (cols + 1))
            self._eigen = (ky[:, None] + kx[None, :])[:, :, None]

    def blend(self, face: np.ndarray) -> np.ndarray:
        """Poisson-blend a face already resized to the rectangle (h×w×3) with the portrait → float64 h×w×3."""
        from scipy.fft import dstn, idstn

        src = np.asarray(face, dtype=np.float64)
        if src.shape[:2] != (self.size[1], self.size[0]):
            raise ValueError(f"face must be {self.size[0]}×{self.size[1]}, got {src.shape[1]}×{src.shape[0]}")
        out = self._target.copy()
        if self._eigen is None:  # a rectangle 1–2 px thin has no interior: it is all border
            return out
        diff = self._target - src  # only its border values matter
        rhs = np.zeros_like(src[1:-1, 1:-1])
        rhs[0] += diff[0, 1:-1]
        rhs[-1] += diff[-1, 1:-1]
        rhs[:, 0] += diff[1:-1, 0]
        rhs[:, -1] += diff[1:-1, -1]
        harmonic = idstn(dstn(rhs, type=1, axes=(0, 1), norm="ortho") / self._eigen, type=1, axes=(0, 1), norm="ortho")
        out[1:-1, 1:-1] = src[1:-1, 1:-1] + harmonic
        return out

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Resize a rendered frame (OpenCV-style bilinear) to the rectangle, blend it, return the whole portrait."""
        from renderer.sadtalker.preprocess import resize_bilinear

        face = np.asarray(frame)
        if face.shape[:2] != (self.size[1], self.size[0]):
            face = resize_bilinear(face, self.size)
        blended = np.clip(np.rint(self.blend(face)), 0, 255).astype(np.uint8)
        out = self.image.copy()
        x1, y1, x2, y2 = self.box
        out[y1:y2, x1:x2] = blended
        return out
