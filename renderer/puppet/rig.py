"""The puppet's face rig: a landmark mesh over the portrait, deformed per frame and drawn with one dense remap.

The mesh is a Delaunay triangulation of the 68 dlib landmarks (plus four lip midpoints), a few forehead points,
a ring around the head (moves with it), a ring further out and the picture's border (both fixed, so the
background stays put). Each frame moves the vertices (lips, jaw, head pose) and draws the picture
through the piecewise-affine map from the moved mesh back to the rest mesh:

1. per triangle, the affine map output pixel → barycentric → source pixel (12 numbers, ~190 triangles);
2. per pixel of the box that can move, the moved triangle that holds it: the previous frame's triangle is the
   first guess, and pixels that fell outside it step to the neighbour across the violated edge (a vectorised
   "visibility walk"; nearly all pixels settle at once). At 512 px the map is found on every second pixel and
   interpolated (the map is piecewise linear, so this costs nothing visible);
3. one bilinear sample of the portrait per pixel of that box; the rest of the picture is copied.

Then the inside of the mouth is painted between the moved inner lip edges (a dark seam when closed; open, a cavity
with the tongue, and teeth sized to the mouth and lit like the skin), and a blink closes the lids with the portrait's
own lid skin slid down over the eye (`_paint_lids`): the mesh does not move for a blink, so glasses do not bend.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

#: Landmark groups (iBUG-68).
OUTER_UPPER = [49, 50, 51, 52, 53]
OUTER_LOWER = [55, 56, 57, 58, 59]
#: Extra mesh points halfway along the inner lip edges near the corners, so the opening is rounded, not a hexagon:
#: 68 = mid(60, 61), 69 = mid(63, 64), 70 = mid(64, 65), 71 = mid(67, 60).
_LIP_MIDPOINTS = [(60, 61), (63, 64), (64, 65), (67, 60)]
#: Inner lip pairs (upper, lower) from the left corner to the right corner.
_INNER_PAIRS = [(68, 71), (61, 67), (62, 66), (63, 65), (69, 70)]
#: Landmarks plus lip midpoints: the face vertices that the lips, jaw and lids move.
N_FACE = 72
#: Inner lip contours through the corners, left to right (for painting the mouth).
INNER_UPPER_CONTOUR = [60, 68, 61, 62, 63, 69, 64]
INNER_LOWER_CONTOUR = [60, 71, 67, 66, 65, 70, 64]
LEFT_EYE_UPPER, LEFT_EYE_LOWER = [37, 38], [41, 40]
RIGHT_EYE_UPPER, RIGHT_EYE_LOWER = [43, 44], [47, 46]

#: Depth of each landmark in front of the head's turning axis, in face widths (nose tip furthest).
_DEPTH = np.concatenate(
    [
        [0.12, 0.18, 0.24, 0.3, 0.36, 0.42, 0.46, 0.5, 0.52, 0.5, 0.46, 0.42, 0.36, 0.3, 0.24, 0.18, 0.12],  # jaw
        np.full(10, 0.5),  # brows
        [0.58, 0.63, 0.68, 0.74],  # nose bridge to tip
        np.full(5, 0.64),  # nostrils
        np.full(12, 0.48),  # eyes
        np.full(20, 0.58),  # mouth
        np.full(4, 0.58),  # lip midpoints
    ]
)
_FOREHEAD_DEPTH = 0.45
#: Lip gap at full opening (mouth_open = 1, expression_scale = 1) and its ceiling, in mouth widths.
OPEN_GAP = 0.45
MAX_GAP = 0.62
#: Smallest lip gap kept in the mesh (pixels): closed lips never cross, so no triangle flips.
MIN_GAP = 0.8
#: Share of a gap change taken by the upper lip (the jaw and lower lip do the rest).
_UPPER_SHARE = 0.18
#: How far the jaw points follow the lower lip (chin most).
_JAW_FOLLOW = {3: 0.05, 4: 0.14, 5: 0.28, 6: 0.42, 7: 0.56, 8: 0.64, 9: 0.56, 10: 0.42, 11: 0.28, 12: 0.14, 13: 0.05}
#: Horizontal mouth stretch per unit of width (-1 round .. +1 spread) and narrowing at full opening.
_WIDTH_STRETCH = 0.13
_OPEN_NARROW = 0.08
#: The coarse grid of the map has about this many cells across the picture (a cell of 4 pixels at 256, 8 at 512).
_GRID_CELLS = 64
#: Around the lips the map is found on every second pixel (its error there stays under half a pixel).
_LIP_STRIDE = 2
#: The strip of upper-lid skin (above the open lid's edge, in eye widths) that a blink stretches down over the eye.
_LID_SKIN = 0.3
#: Below this closure nothing is drawn (the eye at rest is the portrait's own).
_BLINK_MIN = 0.03
#: The bottom of the strip (the lid margin and lashes) that keeps its height as the lid slides down.
_LID_MARGIN = 0.35


@dataclasses.dataclass
class _Grid:
    """Points where the map is found exactly, and the moved triangle that held each in the last frame: the coarse
    grid over the box, then the fine one around the lips, one after the other (one walk finds both)."""

    x: np.ndarray
    y: np.ndarray
    hint: np.ndarray
    #: (rows, columns) of each part, in order.
    shapes: tuple[tuple[int, int], ...]

    def parts(self, values: np.ndarray) -> list[np.ndarray]:
        """A flat array over all points → one (rows, columns) array per part."""
        out, start = [], 0
        for rows, cols in self.shapes:
            out.append(values[start : start + rows * cols].reshape(rows, cols))
            start += rows * cols
        return out


@dataclasses.dataclass(frozen=True)
class Pose:
    """One frame of animation: mouth opening 0..1, width -1..1, blink 0..1 and head angles in degrees."""

    mouth_open: float = 0.0
    mouth_width: float = 0.0
    blink: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0


def _ellipse(centre: np.ndarray, rx: float, ry: float, count: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.linspace(0, 2 * np.pi, count, endpoint=False)
    return np.stack([centre[0] + rx * np.cos(angles), centre[1] + ry * np.sin(angles)], axis=1)


def _border(width: int, height: int, per_side: int = 4) -> np.ndarray:
    xs = np.linspace(0, width - 1, per_side + 1)
    ys = np.linspace(0, height - 1, per_side + 1)
    top = np.stack([xs, np.zeros_like(xs)], 1)
    bottom = np.stack([xs, np.full_like(xs, height - 1)], 1)
    left = np.stack([np.zeros_like(ys[1:-1]), ys[1:-1]], 1)
    right = np.stack([np.full_like(ys[1:-1], width - 1), ys[1:-1]], 1)
    return np.concatenate([top, bottom, left, right])


def _smooth_curve(xs: np.ndarray, px: np.ndarray, py: np.ndarray, width: float) -> np.ndarray:
    """y of a lip contour through points (px, py) at columns xs (sorted by x, linear between points), its corners
    rounded by a moving average over `width` columns (the mouth's lip points are a few pixels apart)."""
    order = np.argsort(px, kind="stable")
    ys = np.interp(xs, px[order], py[order])
    k = max(int(width) | 1, 1)
    if k < 3 or len(ys) < k:
        return ys
    padded = np.concatenate([np.full(k // 2, ys[0]), ys, np.full(k // 2, ys[-1])])
    sums = np.cumsum(np.concatenate([[0.0], padded]))
    return (sums[k:] - sums[:-k]) / k


def _arc(xs: np.ndarray, points: np.ndarray) -> np.ndarray:
    """y of a smooth lid arc (least-squares parabola) through points (x, y), at columns xs."""
    if np.ptp(points[:, 0]) < 2.0:
        return np.full(len(xs), points[:, 1].mean())
    return np.polyval(np.polyfit(points[:, 0], points[:, 1], 2), xs)


class FaceRig:
    """A portrait with its face mesh, ready to draw frames for any `Pose`."""

    def __init__(self, image: np.ndarray, landmarks: np.ndarray, *, expression_scale: float = 1.0) -> None:
        from scipy.spatial import Delaunay

        self.height, self.width = image.shape[:2]
        self.image = np.ascontiguousarray(image, dtype=np.uint8)
        self.expression_scale = float(expression_scale)
        lm = np.asarray(landmarks, dtype=np.float64).copy()
        lm[:, 0] = np.clip(lm[:, 0], 1.0, self.width - 2.0)
        lm[:, 1] = np.clip(lm[:, 1], 1.0, self.height - 2.0)
        self.landmarks = lm
        self._measure(lm)

        self.rest, self.head_weight, self.depth = self._mesh_vertices(lm)
        self.pivot = np.array([self.face_centre[0], lm[8, 1] + 0.25 * self.face_height])
        self._pairs = np.array(_INNER_PAIRS)
        left, right = self.rest[60, 0], self.rest[64, 0]
        centre_x = self.rest[self._pairs, 0].mean(axis=1)
        self._pair_u = np.clip((centre_x - (left + right) / 2) / max((right - left) / 2, 1.0), -0.95, 0.95)
        self._inner_upper = np.array(INNER_UPPER_CONTOUR)
        self._inner_lower = np.array(INNER_LOWER_CONTOUR)
        self._lip_points = np.r_[48:68, 68:N_FACE]

        tri = Delaunay(self.rest)
        self.simplices = tri.simplices.astype(np.int32)
        self.neighbors = tri.neighbors.astype(np.int32)
        a, b, c = (self.rest[self.simplices[:, k]] for k in range(3))
        self._rest_sign = np.sign((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]))
        moving = self.head_weight > 0
        moving[:N_FACE] = True
        dynamic = moving[self.simplices].any(axis=1)

        # The box that can change: dynamic triangles, grown by how far a vertex can travel.
        corners = self.rest[self.simplices[dynamic].ravel()]
        reach = 0.12 * self.face_width + 3.0
        self.box = (
            int(max(math.floor(corners[:, 0].min() - reach), 0)),
            int(max(math.floor(corners[:, 1].min() - reach), 0)),
            int(min(math.ceil(corners[:, 0].max() + reach), self.width - 1)),
            int(min(math.ceil(corners[:, 1].max() + reach), self.height - 1)),
        )
        # The map from output pixels to portrait pixels is found exactly on a coarse grid over the box (every
        # `_STRIDE`-th pixel, placed where OpenCV's linear resize puts its samples) and interpolated; the lips, where
        # the map bends sharply, get it exactly on every pixel.
        x0, y0, x1, y1 = self.box
        self.stride = max(2, int(round(max(self.width, self.height) / _GRID_CELLS)))
        pad = 0.3 * self.mouth_width + 2.0
        lips = lm[48:68]
        self.lip_box = (
            int(max(math.floor(lips[:, 0].min() - pad), x0)),
            int(max(math.floor(lips[:, 1].min() - pad), y0)),
            int(min(math.ceil(lips[:, 0].max() + pad), x1)),
            int(min(math.ceil(lips[:, 1].max() + MAX_GAP * self.mouth_width + pad), y1)),
        )
        #: The two grids' boxes and strides: the coarse one over the box, the fine one at the lips.
        self._parts = ((self.box, self.stride), (self.lip_box, _LIP_STRIDE))
        self._points = self._grid(self._parts)
        self._columns = np.arange(x0, x1 + 1, dtype=np.float32)[None, :]
        self._rows = np.arange(y0, y1 + 1, dtype=np.float32)[:, None]
        self._sample_skin()

    def _rasterize(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Index of the rest triangle holding each grid point (len(ys), len(xs)); a one-off loop over triangles.

        (scipy's Delaunay.find_simplex would do, but its first call builds transforms slowly: seconds here.)
        """
        cx = np.clip(xs, 0.0, self.width - 1.0)
        cy = np.clip(ys, 0.0, self.height - 1.0)
        out = np.zeros((len(cy), len(cx)), np.int32)
        for index, corners in enumerate(self.rest[self.simplices]):
            (ax, ay), (bx, by), (qx, qy) = corners
            i0, i1 = np.searchsorted(cx, [min(ax, bx, qx) - 1e-6, max(ax, bx, qx) + 1e-6], side="left")
            j0, j1 = np.searchsorted(cy, [min(ay, by, qy) - 1e-6, max(ay, by, qy) + 1e-6], side="left")
            if i1 <= i0 or j1 <= j0:
                continue
            px, py = np.meshgrid(cx[i0:i1], cy[j0:j1])
            det = (bx - ax) * (qy - ay) - (qx - ax) * (by - ay)
            if abs(det) < 1e-9:
                continue
            b1 = ((qy - ay) * (px - ax) - (qx - ax) * (py - ay)) / det
            b2 = ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) / det
            inside = (b1 >= -1e-7) & (b2 >= -1e-7) & (b1 + b2 <= 1 + 1e-7)
            out[j0:j1, i0:i1][inside] = index
        return out

    def motion_mask(self) -> np.ndarray:
        """uint8 (H, W): 255 where the rig animates, fading to 0 toward the fixed ring (for blending back)."""
        from scipy.ndimage import gaussian_filter

        simplex = self._rasterize(np.arange(self.width, dtype=np.float64), np.arange(self.height, dtype=np.float64))
        moving = self.head_weight > 0
        moving[:N_FACE] = True
        # Triangles whose corners all move are fully animated; those that also touch fixed points fade out.
        share = moving[self.simplices].mean(axis=1)
        inside = share[simplex]
        mask = gaussian_filter(inside.astype(np.float32), sigma=0.02 * self.width)
        # Nothing moves at the square's edge, so the blend back into the whole picture has no seam there.
        ramp = max(0.04 * self.width, 2.0)
        mask *= np.clip(np.minimum(np.arange(self.width), np.arange(self.width)[::-1]) / ramp, 0, 1)[None, :]
        mask *= np.clip(np.minimum(np.arange(self.height), np.arange(self.height)[::-1]) / ramp, 0, 1)[:, None]
        return np.clip(mask * 255.0 + 0.5, 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ measurements
    def _mesh_vertices(self, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rest positions, head-motion weights and depths (pixels) of the mesh vertices.

        Landmarks + lip midpoints (opened a hair where lips or lids touch, so the triangulation keeps them apart),
        forehead points, a ring around the head (moves with it; less at the neck), a fixed outer ring pulled
        inside the picture, and the picture's border (fixed).
        """
        rest = np.concatenate([lm, [(lm[a] + lm[b]) / 2 for a, b in _LIP_MIDPOINTS]])
        eye_pairs = list(zip(LEFT_EYE_UPPER + RIGHT_EYE_UPPER, LEFT_EYE_LOWER + RIGHT_EYE_LOWER, strict=True))
        for up, low in _INNER_PAIRS + eye_pairs:
            if rest[low, 1] - rest[up, 1] < 1.0:
                mid = (rest[low, 1] + rest[up, 1]) / 2
                rest[up, 1], rest[low, 1] = mid - 0.5, mid + 0.5
        margin = 3.0
        low_xy = np.array([margin, margin])
        high_xy = np.array([self.width - 1 - margin, self.height - 1 - margin])

        def inside(points: np.ndarray) -> np.ndarray:
            return points[((points > low_xy) & (points < high_xy)).all(axis=1)]

        forehead = inside(lm[[17, 19, 21, 22, 24, 26]] - np.array([0.0, 0.42 * self.face_height]))
        head_centre = np.array([self.face_centre[0], self.face_centre[1] - 0.12 * self.face_height])
        ring = _ellipse(head_centre, 0.9 * self.face_width, 1.12 * self.face_height, 16, phase=np.pi / 16)
        head = inside(ring)
        fixed = np.clip(_ellipse(head_centre, 1.45 * self.face_width, 1.6 * self.face_height, 20), low_xy, high_xy)
        border = _border(self.width, self.height)
        neck = head[:, 1] > lm[8, 1] - 0.1 * self.face_height  # the neck moves less than the skull
        points = np.concatenate([rest, forehead, head, fixed, border])
        weights = np.concatenate(
            [np.ones(N_FACE + len(forehead)), np.where(neck, 0.3, 1.0), np.zeros(len(fixed) + len(border))]
        )
        depth = np.concatenate(
            [_DEPTH, np.full(len(forehead), _FOREHEAD_DEPTH), np.zeros(len(head) + len(fixed) + len(border))]
        )
        # Drop extra points that crowd another one (a sliver triangle is harmless but useless).
        keep = np.ones(len(points), bool)
        for i in range(N_FACE, len(points)):
            if np.min(np.hypot(*(points[:i][keep[:i]] - points[i]).T)) < 2.0:
                keep[i] = False
        points, weights, depth = points[keep], weights[keep], depth[keep] * self.face_width
        # Near a fixed point the head sways less, so no triangle between them can fold over (hair against the
        # picture's edge in a tight crop): full motion from a third of a face width away.
        fixed_points = points[weights == 0]
        nearest = np.min(np.hypot(*(points[:, None, :] - fixed_points[None, :, :]).transpose(2, 0, 1)), axis=1)
        weights = weights * np.clip(nearest / (0.33 * self.face_width), 0.0, 1.0)
        return points, weights, depth

    def _measure(self, lm: np.ndarray) -> None:
        self.face_width = max(float(np.hypot(*(lm[16] - lm[0]))), 4.0)
        brow = lm[17:27, 1].mean()
        self.face_height = float(lm[8, 1] - brow) * 1.25
        self.face_centre = np.array([lm[[0, 16, 27, 8], 0].mean(), (brow + lm[8, 1]) / 2])
        self.mouth_width = max(float(np.hypot(*(lm[54] - lm[48]))), 2.0)
        self.mouth_centre = lm[48:68].mean(axis=0)

    def _sample_skin(self) -> None:
        """Colours taken from the portrait once: lips (for the mouth's inside), lid edges (lashes), brightness."""
        img = self.image.astype(np.float32)
        lm = self.landmarks

        def at(points: np.ndarray) -> np.ndarray:
            xs = np.clip(np.round(points[:, 0]).astype(int), 0, self.width - 1)
            ys = np.clip(np.round(points[:, 1]).astype(int), 0, self.height - 1)
            return img[ys, xs]

        bridge = np.linspace(lm[27], lm[30], 8)
        cheeks = np.concatenate([np.linspace(lm[2], lm[31], 6), np.linspace(lm[14], lm[35], 6)])
        skin = np.median(at(np.concatenate([bridge, cheeks])), axis=0)
        luminance = float(skin @ np.array([0.299, 0.587, 0.114], np.float32))
        self.lighting = float(np.clip(luminance / 170.0, 0.45, 1.15))
        lip_points = np.concatenate(
            [(lm[[50, 51, 52]] + lm[[61, 62, 63]]) / 2, (lm[[56, 57, 58]] + lm[[65, 66, 67]]) / 2]
        )
        lips = np.median(at(lip_points), axis=0)
        # Inside of the mouth: the lips' hue, much darker; the tongue a little lighter toward the bottom.
        self._cavity = (lips * np.array([0.26, 0.14, 0.14])).astype(np.float32)
        self._tongue = (lips * np.array([0.78, 0.46, 0.46])).astype(np.float32)
        self._seam = (lips * np.array([0.42, 0.32, 0.32])).astype(np.float32)
        # Teeth: ivory lit like the skin (its brightness and colour cast), a little darker than it inside the mouth.
        cast = skin / max(float(skin.mean()), 1.0)
        ivory = np.array([0.94, 0.9, 0.8]) * np.clip(cast, 0.75, 1.25) ** 0.8
        self._enamel = (ivory * min(luminance * 1.05, 235.0)).astype(np.float32)

    # ------------------------------------------------------------------ geometry
    def _lip_offsets(self, pose: Pose) -> np.ndarray:
        """Offsets of the landmarks and lip midpoints (first N_FACE vertices) for a mouth opening and width."""
        rest = self.rest
        offset = np.zeros((N_FACE, 2))
        mw = self.mouth_width
        width = float(np.clip(pose.mouth_width, -1.0, 1.0))
        target = min(max(pose.mouth_open, 0.0) * OPEN_GAP * self.expression_scale, MAX_GAP) * mw
        # Rounded lips open as an even oval, spread lips mostly in the middle.
        profile = np.sqrt(np.clip(1.0 - self._pair_u**2, 0.0, 1.0)) ** (1.0 + 0.35 * width)
        gaps = np.maximum(target * profile, MIN_GAP)
        delta = gaps - (rest[self._pairs[:, 1], 1] - rest[self._pairs[:, 0], 1])
        offset[self._pairs[:, 0], 1] = -_UPPER_SHARE * delta
        offset[self._pairs[:, 1], 1] = (1 - _UPPER_SHARE) * delta
        lower = (1 - _UPPER_SHARE) * float(delta[len(delta) // 2])
        for corner in (48, 54, 60, 64):
            offset[corner, 1] = 0.3 * lower
        # Outer lips move with the inner lip above/below them (the lips keep their thickness).
        for outer, inner in ((OUTER_UPPER, self._inner_upper), (OUTER_LOWER, self._inner_lower)):
            order = inner[np.argsort(rest[inner, 0])]
            offset[outer, 1] = np.interp(rest[outer, 0], rest[order, 0], offset[order, 1])
        for point, follow in _JAW_FOLLOW.items():
            offset[point, 1] = follow * lower
        # Width: stretch the lips about the mouth centre; an open jaw narrows the mouth a little.
        stretch = _WIDTH_STRETCH * width - _OPEN_NARROW * target / (OPEN_GAP * mw)
        lips = self._lip_points
        offset[lips, 0] += (rest[lips, 0] - self.mouth_centre[0]) * stretch
        return offset

    def _head(self, points: np.ndarray, pose: Pose) -> np.ndarray:
        yaw, pitch, roll = (math.radians(a) for a in (pose.yaw, pose.pitch, pose.roll))
        if yaw == pitch == roll == 0.0:
            return points
        c, s = math.cos(roll), math.sin(roll)
        rel = points - self.pivot
        rotated = self.pivot + rel @ np.array([[c, s], [-s, c]])
        parallax = np.stack([math.sin(yaw) * self.depth, math.sin(pitch) * self.depth], axis=1)
        return points + self.head_weight[:, None] * (rotated + parallax - points)

    def deform(self, pose: Pose) -> np.ndarray:
        """Mesh vertex positions for a pose (rest mesh + lips, jaw, lids, then head motion).

        If an extreme pose (a large expression_scale on a tight crop) would fold a triangle over its neighbour,
        the face's own motion is scaled back until none folds: the picture may not tear or mirror.
        """
        local = self._lip_offsets(pose)
        for _ in range(10):
            points = self.rest.copy()
            points[:N_FACE] += local
            points = self._head(points, pose)
            if not self._folds(points):
                return points
            local *= 0.8
        return self._head(self.rest.copy(), pose)

    def _folds(self, points: np.ndarray) -> bool:
        a, b, c = (points[self.simplices[:, k]] for k in range(3))
        area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
        return bool(np.any(area * self._rest_sign < -1e-6))

    # ------------------------------------------------------------------ drawing
    def _triangle_maps(self, points: np.ndarray) -> list[np.ndarray]:
        """Per triangle, 12 coefficients: output (x, y, 1) → barycentric b1, b2 and → source x, y."""
        a, b, c = (points[self.simplices[:, k]] for k in range(3))
        ra, rb, rc = (self.rest[self.simplices[:, k]] for k in range(3))
        e1, e2 = b - a, c - a
        det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
        flat = np.abs(det) < 1e-6
        det = np.where(flat, 1.0, det)
        b1 = np.stack([e2[:, 1], -e2[:, 0], e2[:, 0] * a[:, 1] - e2[:, 1] * a[:, 0]], 1) / det[:, None]
        b2 = np.stack([-e1[:, 1], e1[:, 0], e1[:, 1] * a[:, 0] - e1[:, 0] * a[:, 1]], 1) / det[:, None]
        b1[flat] = (0.0, 0.0, -1.0)  # a collapsed triangle holds no pixel: send the walk onward
        b2[flat] = (0.0, 0.0, -1.0)
        # source = ra + b1 (rb - ra) + b2 (rc - ra), linear in (x, y, 1)
        d1, d2 = rb - ra, rc - ra
        src_x = d1[:, 0, None] * b1 + d2[:, 0, None] * b2
        src_y = d1[:, 1, None] * b1 + d2[:, 1, None] * b2
        src_x[:, 2] += ra[:, 0]
        src_y[:, 2] += ra[:, 1]
        coefficients = np.concatenate([b1, b2, src_x, src_y], axis=1).astype(np.float32)
        return [np.ascontiguousarray(coefficients[:, k]) for k in range(12)]

    def _grid(self, parts: tuple[tuple[tuple[int, int, int, int], int], ...]) -> _Grid:
        """Grid points over each box (x0, y0, x1, y1) every `stride` pixels, at the centres of stride×stride cells
        (where OpenCV's linear resize puts its samples)."""
        xs, ys, hints, shapes = [], [], [], []
        for (x0, y0, x1, y1), stride in parts:
            offset = (stride - 1) / 2
            gx = x0 + offset + stride * np.arange(-(-(x1 - x0 + 1) // stride), dtype=np.float64)
            gy = y0 + offset + stride * np.arange(-(-(y1 - y0 + 1) // stride), dtype=np.float64)
            grid_y, grid_x = np.meshgrid(gy, gx, indexing="ij")
            xs.append(grid_x.ravel())
            ys.append(grid_y.ravel())
            hints.append(self._rasterize(gx, gy).ravel())
            shapes.append((len(gy), len(gx)))
        x, y = (np.concatenate(v).astype(np.float32) for v in (xs, ys))
        return _Grid(x, y, np.concatenate(hints), tuple(shapes))

    def _locate(self, maps: list[np.ndarray], grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates of every grid point: walk each point to the moved triangle that holds it, starting
        from the one that held it in the previous frame (most points are still there; the rest are a few
        triangles away, so each step looks again at only the points not yet placed)."""
        t, x, y = grid.hint, grid.x, grid.y
        todo: np.ndarray | None = None  # None: every point
        for _ in range(32):
            tt, xx, yy = (t, x, y) if todo is None else (t[todo], x[todo], y[todo])
            b1 = maps[0][tt] * xx + maps[1][tt] * yy + maps[2][tt]
            b2 = maps[3][tt] * xx + maps[4][tt] * yy + maps[5][tt]
            barycentric = np.stack([1.0 - b1 - b2, b1, b2])
            worst = barycentric.argmin(axis=0)
            outside = np.take_along_axis(barycentric, worst[None], axis=0)[0] < -1e-4
            todo = np.flatnonzero(outside) if todo is None else todo[outside]
            if not len(todo):
                break
            # Step across the violated edge; beyond the hull (past the border) the border triangle's map extends.
            nxt = self.neighbors[t[todo], worst[outside]]
            inside = nxt >= 0
            todo = todo[inside]
            t[todo] = nxt[inside]
        sx = maps[6][t] * x + maps[7][t] * y + maps[8][t]
        sy = maps[9][t] * x + maps[10][t] * y + maps[11][t]
        return sx, sy

    def remap(self, points: np.ndarray) -> np.ndarray:
        """The portrait drawn through the moved mesh (before painting): OpenCV's bilinear remap over the box."""
        import cv2

        sx, sy = self._locate(self._triangle_maps(points), self._points)
        x0, y0, x1, y1 = self.box
        lx0, ly0, lx1, ly1 = self.lip_box
        maps = []
        for shift, position in ((sx - self._points.x, self._columns), (sy - self._points.y, self._rows)):
            # Interpolate the displacement, not the position: it is 0 at the picture's fixed border, where the
            # resize holds its edge values. The coarse grid covers the box; the fine one, at the lips, goes over it.
            whole, lips = (
                cv2.resize(exact, (exact.shape[1] * stride, exact.shape[0] * stride), interpolation=cv2.INTER_LINEAR)
                for exact, (_, stride) in zip(self._points.parts(shift), self._parts, strict=True)
            )
            whole = whole[: y1 - y0 + 1, : x1 - x0 + 1]
            whole[ly0 - y0 : ly1 - y0 + 1, lx0 - x0 : lx1 - x0 + 1] = lips[: ly1 - ly0 + 1, : lx1 - lx0 + 1]
            maps.append(whole + position)
        drawn = cv2.remap(self.image, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if drawn.shape[:2] == self.image.shape[:2]:
            return drawn
        frame = self.image.copy()
        frame[y0 : y1 + 1, x0 : x1 + 1] = drawn
        return frame

    def render(self, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        """Draw one frame; returns (RGB uint8 frame, moved vertex positions)."""
        points = self.deform(pose)
        frame = self.remap(points)
        self._paint_mouth(frame, points)
        if pose.blink > _BLINK_MIN:
            self._paint_lids(frame, points, pose)
        return frame, points

    # ------------------------------------------------------------------ painting
    def _box(self, pts: np.ndarray, pad: float) -> tuple[int, int, int, int]:
        x0 = int(max(math.floor(pts[:, 0].min() - pad), 0))
        x1 = int(min(math.ceil(pts[:, 0].max() + pad), self.width - 1))
        y0 = int(max(math.floor(pts[:, 1].min() - pad), 0))
        y1 = int(min(math.ceil(pts[:, 1].max() + pad), self.height - 1))
        return x0, x1, y0, y1

    def _paint_mouth(self, frame: np.ndarray, points: np.ndarray) -> None:
        """Paint the inside of the mouth between the inner lip edges (rounded curves through the moved lip points):
        a dark seam when closed; when open a cavity, darkest at the back, the tongue's lit back rising from the
        lower lip, the upper teeth under the upper lip (as deep as the opening allows, no more than a tenth of the
        mouth's width, in the lip's shadow at the top and the cheeks' toward the corners, with faint gaps between
        the incisors) and, wide open, the edge of the lower teeth."""
        x0, x1, y0, y1 = self._box(points[INNER_UPPER_CONTOUR + INNER_LOWER_CONTOUR], 2.0)
        if x1 <= x0 or y1 <= y0:
            return
        xs = np.arange(x0, x1 + 1, dtype=np.float64)
        rounding = 0.12 * self.mouth_width
        top = _smooth_curve(xs, points[INNER_UPPER_CONTOUR, 0], points[INNER_UPPER_CONTOUR, 1], rounding)
        bottom = _smooth_curve(xs, points[INNER_LOWER_CONTOUR, 0], points[INNER_LOWER_CONTOUR, 1], rounding)
        bottom = np.maximum(bottom, top)
        gap = bottom - top
        middle = (top + bottom) / 2
        half_gap = np.maximum(gap / 2, 0.5)
        ys = np.arange(y0, y1 + 1, dtype=np.float64)[:, None]
        left, right = points[60, 0], points[64, 0]
        half = max((right - left) / 2, 1.0)
        u = np.clip((xs - (left + right) / 2) / half, -1.5, 1.5)[None, :]
        within = np.clip((1.0 - np.abs(u)) * half, 0.0, 1.0)
        band = np.clip(ys - (middle - half_gap) + 0.5, 0, 1) * np.clip(middle + half_gap - ys + 0.5, 0, 1)
        opened = np.clip((gap - 1.0) / 3.0, 0.0, 1.0)[None, :]
        alpha = band * within * (0.45 + 0.55 * opened)
        if not alpha.any():
            return
        mw = self.mouth_width
        depth_y = ys - top  # below the upper lip's edge
        # Cavity: darkest at the back and toward the corners.
        colour = self._cavity * (1.0 - 0.35 * np.clip(1.0 - u**2, 0, 1))[..., None] + np.zeros((len(ys), 1, 3))
        # Tongue: a rounded hump resting on the lower lip, lit on its upper surface.
        hump = bottom[None, :] - 0.42 * gap[None, :] * np.sqrt(np.clip(1.0 - (u / 0.75) ** 2, 0, 1))
        tongue = np.clip((ys - hump) / np.maximum(0.12 * gap[None, :], 1.0), 0, 1) * (gap[None, :] > 2.0)
        lit = 1.0 - 0.35 * np.clip((ys - hump) / np.maximum(0.4 * gap[None, :], 1.0), 0, 1)
        colour += (self._tongue * lit[..., None] - colour) * tongue[..., None]
        colour = self._seam + (colour - self._seam) * opened[..., None]
        # Upper teeth.
        height = np.minimum(0.32 * gap, 0.1 * mw)[None, :]
        upper = np.clip(height - depth_y + 0.5, 0, 1) * np.clip((gap[None, :] - 3.0) / 3.0, 0, 1)
        shade = (0.72 + 0.28 * np.clip(depth_y / np.maximum(0.4 * height, 1.0), 0, 1)) * (1.0 - 0.55 * u**2)
        # Faint gaps between the teeth: the incisors meet at the middle, the next gaps every 0.27 half-widths.
        gaps_between = 1.0 - 0.1 * np.exp(-(((np.abs(u) + 0.135) % 0.27 - 0.135) ** 2) / 0.0008)
        teeth = self._enamel * (shade * gaps_between)[..., None]
        colour += (teeth - colour) * (upper * np.clip((0.8 - np.abs(u)) / 0.2, 0, 1))[..., None]
        # Lower teeth: a thin edge above the lower lip when the mouth is wide open, in more shade.
        lower_height = np.clip(0.12 * gap - 0.02 * mw, 0, 0.05 * mw)[None, :]
        lower = np.clip(ys - (bottom[None, :] - lower_height) + 0.5, 0, 1) * (lower_height > 0.3)
        colour += (teeth * 0.7 - colour) * (lower * np.clip((0.55 - np.abs(u)) / 0.2, 0, 1))[..., None]
        region = frame[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
        a = alpha[..., None]
        frame[y0 : y1 + 1, x0 : x1 + 1] = np.clip(region + (colour - region) * a + 0.5, 0, 255).astype(np.uint8)

    def _paint_lids(self, frame: np.ndarray, points: np.ndarray, pose: Pose) -> None:
        """Close the upper lids by `pose.blink` with the portrait's own lid: the skin strip above each open lid's
        edge slides down to the moving edge, its bottom rows (the lid margin and lashes) unchanged, the rows above
        them stretched; the more they stretch, the more they take the smooth colour of the skin around the eye
        (a thin strip stretched far would show streaks), shaded darker toward the edge where the lid curves over
        the eyeball.

        The mesh does not move for a blink and only the strip and the eye opening below it change: glasses in front
        of the eyes are not bent and their rims, above and below the opening, are not painted over."""
        from scipy.ndimage import uniform_filter1d

        closure = float(np.clip(pose.blink, 0.0, 1.0))
        for upper, lower in (([36, 37, 38, 39], [39, 40, 41, 36]), ([42, 43, 44, 45], [45, 46, 47, 42])):
            left, right = points[upper[0], 0], points[upper[-1], 0]
            span = max(right - left, 1.0)
            skin = _LID_SKIN * span + 1.0
            margin = _LID_MARGIN * skin
            x0, x1, _, y1 = self._box(np.concatenate([points[upper], points[lower]]), 1.0)
            y0 = max(int(math.floor(points[upper, 1].min() - skin - 2)), 0)
            y1 = min(y1 + int(skin), self.height - 1)
            if x1 - x0 < 3 or y1 <= y0:
                continue
            xs = np.arange(x0, x1 + 1, dtype=np.float64)
            top = _arc(xs, points[upper])
            bottom = np.maximum(_arc(xs, points[lower]), top)
            edge = top + closure * (bottom - top) * 0.97  # the closed lid rests a touch above the lower lid
            start = top - skin
            ys = np.arange(y0, y1 + 1, dtype=np.float64)[:, None]
            # Where each row of the lid comes from: the margin keeps its height, the skin above it stretches.
            stretch = (edge - margin - start) / (top - margin - start)
            source_y = np.where(ys >= edge - margin, ys - (edge - top), start + (ys - start) / stretch)
            weight = np.clip(edge - ys + 0.5, 0, 1) * np.clip(ys - start + 0.5, 0, 1)
            within = np.clip((xs - left) / (0.06 * span) + 0.5, 0, 1) * np.clip(
                (right - xs) / (0.06 * span) + 0.5, 0, 1
            )
            weight *= within[None, :]
            if not weight.any():
                continue
            region = frame[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
            lid = _sample_rows(region, np.clip(source_y - y0, 0, y1 - y0))
            # Skin colour per column: the brighter half of the strip and of the rows under the lower lid (lashes,
            # the iris and rims are darker), smoothed across the eye.
            sampled = np.concatenate([start + np.arange(skin)[:, None], bottom + 2 + np.arange(3)[:, None]])
            rows = np.clip(np.round(sampled) - y0, 0, y1 - y0).astype(np.intp)
            strip = region[rows, np.arange(len(xs))[None, :]]
            order = np.argsort(strip.sum(axis=2), axis=0)
            bright = np.take_along_axis(strip, order[len(order) // 2 :, :, None], axis=0).mean(axis=0)
            colour = uniform_filter1d(bright, size=max(3, int(span / 4)), axis=0)
            smooth = uniform_filter1d(lid, size=max(3, int(span / 10)), axis=1)
            stretched = np.clip((ys - start) / np.maximum(edge - margin - start, 1.0), 0, 1) * (ys < edge - margin)
            blend = (np.clip((stretch - 1.0) / 2.0, 0, 0.75)[None, :] * stretched)[..., None]
            # Toward the skin's colour, keeping a third of the strip's own light and grain (smoothed across).
            grain = smooth.mean(axis=2, keepdims=True) / (colour.mean(axis=1)[None, :, None] + 1.0)
            lid += (colour[None, :, :] * (0.65 + 0.35 * grain) - lid) * blend
            # Shade: the lid curves away from the light toward its edge.
            depth = np.clip((ys - top) / np.maximum(edge - top, 1.0), 0, 1)
            lid *= (1.0 - 0.1 * depth * closure)[..., None]
            region += (lid - region) * weight[..., None]
            frame[y0 : y1 + 1, x0 : x1 + 1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)


def _sample_rows(region: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """region (H, W, 3) sampled at fractional row positions rows (h, W), column by column, linearly."""
    r0 = np.floor(rows).astype(np.intp)
    r1 = np.minimum(r0 + 1, region.shape[0] - 1)
    frac = (rows - r0)[..., None].astype(np.float32)
    cols = np.arange(region.shape[1])[None, :]
    return region[r0, cols] * (1.0 - frac) + region[r1, cols] * frac
