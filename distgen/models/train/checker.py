"""Prompt adherence, seams and trajectories of generated images without a learned metric (issue 17 part 6).

The scenes are procedural (:mod:`.scenes`), so an image can be read back: every pixel is named by its
nearest :data:`~.scenes.PALETTE` colour (or none, when it is farther than ``tolerance`` from all of them),
the background is the caption's background colour (else the commonest name on the border), and the rest
splits into connected components (4-connectivity). A component is an object candidate when it is big
enough (``min_area`` of the image), not a thin anti-aliasing fringe (some interior pixels) and contains its
own centroid (a fringe ring around another object does not). Its shape comes from three numbers:

- ``fill``: area / bounding-box area (square ~1, circle ~0.79, triangle ~0.5, star ~0.4)
- ``solidity``: area / convex-hull area (a star ~0.55, the convex shapes ~1)
- ``corners``: vertices of the convex hull left after Visvalingam simplification (a vertex goes while the
  triangle it spans is under 10 % of the hull's area): triangle 3, square 4, star 5, circle 4-6 (reported;
  the decision uses it only between square and circle)
- ``balance``: area of the bounding box's top half / its bottom half (an upright triangle ~0.33, the
  others ~1): what still tells a triangle when blur has rounded its corners

:func:`check` matches the caption's objects to components (right colour first, then right shape, then
right position, then the larger) and reports, per object, found (some component stands for it) / right
colour / right shape / right position, and overall adherence (the fraction of objects right in all four);
per image, whether the border's commonest colour is the caption's background, and the object candidates
no caption object accounts for (``extra_objects``: what tells a clean scene from coloured noise, in which
some blob of the right colour is usually found).

:func:`seam_score`: the mean absolute difference between adjacent pixel rows (or columns) across given
patch boundaries, against the same away from them. :func:`trajectory` and :func:`trajectory_jumps`: the
first object's centroid per frame, and the step at clip boundaries against the steps inside clips.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import permutations

import numpy as np

from distgen.models.train.scenes import COLOURS, PALETTE, SIZES, CaptionSpec, ObjectSpec, parse_caption

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
MARGIN = 0.42  # a single object is "left" when its centre is left of 0.42 of the width, "right" past 0.58


@dataclass(frozen=True)
class Blob:
    colour: str
    area: int
    cx: float  # centroid, fractions of width / height
    cy: float
    half_extent: float  # half the larger bounding-box side, fraction of the image side
    fill: float
    solidity: float
    corners: int
    balance: float
    shape: str


@dataclass
class ObjectResult:
    spec: ObjectSpec
    found: bool = False
    right_colour: bool = False
    right_shape: bool = False
    right_position: bool = False
    right_size: bool | None = None  # None: the caption does not say
    blob: Blob | None = None

    @property
    def correct(self) -> bool:
        return self.found and self.right_colour and self.right_shape and self.right_position


@dataclass
class Report:
    caption: str
    spec: CaptionSpec
    objects: list[ObjectResult]
    background: str | None
    blobs: list[Blob] = field(default_factory=list)
    border_colour: str | None = None  # the commonest colour name on the image border, as measured

    @property
    def adherence(self) -> float:
        return float(np.mean([o.correct for o in self.objects]))

    @property
    def found_with_colour(self) -> float:
        return float(np.mean([o.found and o.right_colour for o in self.objects]))

    @property
    def right_background(self) -> bool:
        return self.border_colour == self.spec.background

    @property
    def extra_objects(self) -> int:
        """Object candidates the caption does not account for (0 for a clean scene; many for noise)."""
        used = {id(o.blob) for o in self.objects if o.blob is not None}
        return sum(id(b) not in used for b in self.blobs)

    def summary(self) -> dict:
        rate = lambda key: float(np.mean([getattr(o, key) for o in self.objects]))  # noqa: E731
        return {"adherence": self.adherence, "found_with_colour": self.found_with_colour, "found": rate("found"),
                "right_colour": rate("right_colour"), "right_shape": rate("right_shape"),
                "right_position": rate("right_position"), "objects": len(self.objects),
                "right_background": float(self.right_background), "extra_objects": self.extra_objects}


# ---------------------------------------------------------------------------------------- labelling
def _as_array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255)
    return array[..., :3].astype(np.float32)


def label_colours(image, tolerance: float = 110.0) -> np.ndarray:
    """Per pixel, the index into :data:`COLOURS` of its nearest palette colour, -1 when none is within ``tolerance``."""
    rgb = _as_array(image)
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > tolerance] = -1
    return labels


def _border_colour(labels: np.ndarray) -> int:
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    return int(np.bincount(border).argmax()) if border.size else -1


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (4-connectivity) of a boolean mask, each an (n, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain), counter-clockwise, of (n, 2) points."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _polygon_area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _corner_count(hull: np.ndarray, fraction: float = 0.1) -> int:
    """Vertices left after dropping, smallest first, those whose triangle is under ``fraction`` of the area."""
    poly = [tuple(p) for p in hull]
    total = _polygon_area(hull)
    if total <= 0:
        return len(poly)
    while len(poly) > 3:
        areas = [_polygon_area(np.array([poly[i - 1], poly[i], poly[(i + 1) % len(poly)]])) for i in range(len(poly))]
        i = int(np.argmin(areas))
        if areas[i] >= fraction * total:
            break
        poly.pop(i)
    return len(poly)


def classify_shape(fill: float, solidity: float, corners: int, balance: float) -> str:
    """Thresholds set between the features of clean and blurred renders (see tests/test_scenes.py)."""
    if solidity < 0.78:
        return "star"
    if balance < 0.56:
        return "triangle"
    if solidity < 0.86:
        return "star"  # a blurred star: its notches filled in, yet less convex than any circle
    if fill > 0.9:
        return "square"
    return "triangle" if fill < 0.6 else "circle"


def _blob(pixels: np.ndarray, colour: str, height: int, width: int) -> Blob:
    ys, xs = pixels[:, 0], pixels[:, 1]
    area = len(pixels)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    corners_of_pixels = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (0, 1) for dx in (0, 1)])
    hull = _hull(corners_of_pixels)
    hull_area = max(_polygon_area(hull), 1.0)
    fill, solidity, corners = area / float(bh * bw), area / hull_area, _corner_count(hull)
    middle = ys.min() + bh / 2.0 - 0.5  # rows above the bounding box's midline are its top half
    top, bottom = float((ys < middle).sum() + 0.5 * (ys == middle).sum()), float((ys > middle).sum() + 0.5 * (ys == middle).sum())
    balance = top / max(bottom, 1.0)
    side = float(max(height, width))
    return Blob(colour, int(area), float((xs.mean() + 0.5) / width), float((ys.mean() + 0.5) / height),
                float(max(bh, bw) / (2 * side)), float(fill), float(min(solidity, 1.0)), int(corners), float(balance),
                classify_shape(fill, solidity, corners, balance))


def find_blobs(image, background: str | None = None, tolerance: float = 110.0, min_area: float = 0.003) -> tuple[list[Blob], str | None]:
    """Object candidates of an image (see the module docstring) and the background colour used."""
    labels = label_colours(image, tolerance)
    h, w = labels.shape
    bg = COLOURS.index(background) if background is not None else _border_colour(labels)
    blobs = []
    inner = np.zeros_like(labels, dtype=bool)
    for index, colour in enumerate(COLOURS):
        if index == bg:
            continue
        mask = labels == index
        if mask.sum() < min_area * h * w:
            continue
        inner[:] = False
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        for pixels in _components(mask):
            if len(pixels) < min_area * h * w:
                continue
            if inner[pixels[:, 0], pixels[:, 1]].sum() < 0.1 * len(pixels):
                continue  # an anti-aliasing fringe
            cy, cx = np.round(pixels.mean(0)).astype(int)
            near = np.abs(pixels - [cy, cx]).max(1) <= max(1, int(0.02 * max(h, w)))
            if not near.any():
                continue  # a ring around something else
            blobs.append(_blob(pixels, colour, h, w))
    blobs.sort(key=lambda b: -b.area)
    return blobs, (COLOURS[bg] if bg >= 0 else None)


# ------------------------------------------------------------------------------------------ matching
def _position_ok(position: str | None, blob: Blob) -> bool:
    if position is None:
        return True
    return bool({"left": blob.cx < MARGIN, "right": blob.cx > 1 - MARGIN, "top": blob.cy < MARGIN,
            "bottom": blob.cy > 1 - MARGIN,
            "center": abs(blob.cx - 0.5) < 0.15 and abs(blob.cy - 0.5) < 0.15}[position])


def _relation_ok(spec: CaptionSpec, a: Blob, b: Blob) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from the first to the second
    if spec.kind == "two":
        if spec.arrangement == "row":
            return abs(dx) > abs(dy) and abs(dx) > 0.1
        if spec.arrangement == "column":
            return abs(dy) > abs(dx) and abs(dy) > 0.1
        return True
    return {"above": dy > 0.05, "below": dy < -0.05, "left of": dx > 0.05, "right of": dx < -0.05,
            "and": True, None: True}[spec.relation]


def _size_ok(spec: ObjectSpec, blob: Blob) -> bool | None:
    if spec.size is None:
        return None
    threshold = 0.5 * (SIZES["small"] + SIZES["large"])
    return bool((blob.half_extent > threshold) == (spec.size == "large"))


def check(image, caption: str, tolerance: float = 110.0, min_area: float = 0.003) -> Report:
    """How well ``image`` shows ``caption`` (a caption of :mod:`.scenes`' grammar)."""
    spec = parse_caption(caption)
    blobs, background = find_blobs(image, spec.background, tolerance, min_area)
    candidates = blobs[:12]
    n = len(spec.objects)

    def score(assigned: tuple) -> tuple:
        colour = shape = position = 0
        for obj, blob in zip(spec.objects, assigned):
            if blob is None:
                continue
            colour += blob.colour == obj.colour
            shape += blob.shape == obj.shape
            position += _position_ok(obj.position, blob)
        if n == 2 and None not in assigned:
            position += _relation_ok(spec, *assigned)
        found = sum(b is not None for b in assigned)
        return (found, colour, shape, position, sum(b.area for b in assigned if b is not None))

    options = list(permutations(candidates, min(n, len(candidates))))
    options = [tuple(o) + (None,) * (n - len(o)) for o in options] or [(None,) * n]
    best = max(options, key=score)
    results = []
    relation = n == 2 and None not in best and _relation_ok(spec, *best)
    for obj, blob in zip(spec.objects, best):
        result = ObjectResult(obj)
        if blob is not None:
            result.found = True
            result.blob = blob
            result.right_colour = blob.colour == obj.colour
            result.right_shape = blob.shape == obj.shape
            result.right_position = bool(_position_ok(obj.position, blob) and (n == 1 or relation))
            result.right_size = _size_ok(obj, blob)
        results.append(result)
    border = _border_colour(label_colours(image, tolerance))
    return Report(caption, spec, results, background, blobs, COLOURS[border] if border >= 0 else None)


# ---------------------------------------------------------------------------------------------- seams
def seam_score(image, boundaries, axis: int = 0, exclude: int = 2) -> dict:
    """Seam energy at patch boundaries.

    ``boundaries``: pixel rows (axis 0) or columns (axis 1) where a new patch starts. The energy of the gap
    before row ``r`` is the mean absolute difference of rows ``r-1`` and ``r`` over columns and channels
    (0-255 units). ``ratio`` is the boundary gaps' mean over the mean of the gaps at least ``exclude`` rows
    away from every boundary (+1 so that flat images do not divide by zero): about 1 without seams."""
    rgb = _as_array(image)
    if axis == 1:
        rgb = rgb.transpose(1, 0, 2)
    energy = np.abs(np.diff(rgb, axis=0)).mean(axis=(1, 2))  # energy[k]: between rows k and k+1
    gaps = np.array([b - 1 for b in boundaries if 0 < b < rgb.shape[0]], dtype=int)
    if gaps.size == 0:
        raise ValueError(f"no boundary inside the image's {rgb.shape[0]} {'rows' if axis == 0 else 'columns'}")
    away = np.ones(energy.shape, dtype=bool)
    for g in gaps:
        away[max(0, g - exclude):g + exclude + 1] = False
    boundary, elsewhere = float(energy[gaps].mean()), float(energy[away].mean()) if away.any() else 0.0
    return {"boundary": boundary, "elsewhere": elsewhere, "ratio": (boundary + 1.0) / (elsewhere + 1.0),
            "per_boundary": [float(energy[g]) for g in gaps]}


def patch_boundaries(height: int, patches: int) -> list[int]:
    """First pixel rows of patches 1..n-1 of an image split into ``patches`` equal bands."""
    return [height * k // patches for k in range(1, patches)]


# -------------------------------------------------------------------------------------------- video
def trajectory(frames, caption: str, tolerance: float = 110.0) -> list[tuple[float, float] | None]:
    """Centroid (fractions of width / height) of the caption's first object per frame; None where not found."""
    out = []
    for frame in frames:
        result = check(frame, caption, tolerance).objects[0]
        out.append((result.blob.cx, result.blob.cy) if result.found else None)
    return out


def trajectory_jumps(points, boundaries) -> dict:
    """Steps of a trajectory at clip boundaries (``boundaries``: first frames of clips 1..n-1) vs inside clips.

    ``ratio``: mean boundary step over mean inside step (1 for a motion continuous across clips)."""
    at, inside, missing = [], [], sum(p is None for p in points)
    starts = set(boundaries)
    for k in range(1, len(points)):
        if points[k] is None or points[k - 1] is None:
            continue
        step = float(np.hypot(points[k][0] - points[k - 1][0], points[k][1] - points[k - 1][1]))
        (at if k in starts else inside).append(step)
    boundary = float(np.mean(at)) if at else float("nan")
    within = float(np.mean(inside)) if inside else float("nan")
    return {"boundary": boundary, "inside": within, "ratio": boundary / within if within > 0 else float("nan"),
            "missing_frames": int(missing), "boundary_steps": at}
