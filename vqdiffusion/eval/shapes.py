"""Read the objects back from a ``shapes`` image and score them against the prompt.

:func:`detect` works on a 64 x 64 RGB image (other sizes are resized first), with numpy only:

1. foreground = pixels whose brightest channel exceeds :data:`FOREGROUND_THRESHOLD`;
2. 8-connected components by flood fill; components under :data:`MIN_PIXELS` pixels are speckle and ignored;
3. per component, a soft coverage map (brightness above the background's noise floor over the
   component's median interior brightness, including the anti-aliased rim around it) gives sub-pixel
   measures: width and height (longest row and column of coverage), centre (of the bounding box: middle of
   the column and row maxima profiles), area, fill ratio ``area / (width * height)``, ``asym`` (share of
   the area below the centre minus the share above), ``diag`` (longest chord along a diagonal, in pixels,
   over the side) and, on the coverage two pixels around the component, the angular harmonics of
   :func:`angular_moments`: ``elong`` (|m_2|, an ellipse of axes a, b reads a/b - b/a), ``tri`` (|m_3|, an
   upward triangle 1) and ``corners`` (|m_4|, a square 1, a circle 0), unchanged by an isotropic blur;
4. color = nearest palette color to the median RGB of the component's fully covered pixels;
   size = ``large`` when the larger side exceeds 18 px (small ~12, large ~24); position = the 3 x 3 cell
   of the centre; shape by the strict rule below.

Shape, strict rule (:func:`strict_shape`, what ``detect``, ``evaluate`` and ``vqdiffusion eval`` report): a
person calls a square whose corners are rounded off to a radius of a quarter of its side or more no square,
and an oval or a lop-sided blob neither a circle nor a square; the detector then reads
:data:`~vqdiffusion.data.shapes.UNKNOWN_SHAPE`, which is wrong for every prompt.

* ``triangle`` when ``asym`` > 0.15 (an upward triangle holds 3/4 of its area in its lower half: ``asym``
  ~0.5, circles and squares ~0) and ``tri`` >= 0.5 (a dome or bullet that is bottom-heavy but has no
  triangle's three-fold harmonic is ``unknown``);
* otherwise ``unknown`` when ``elong`` > 0.4 (an ellipse 1.22 times as wide as tall) or ``tri`` >= 0.5;
* otherwise ``square`` when ``corners`` >= :data:`SQUARE_CORNERS` = 0.73, ``circle`` when ``corners`` <=
  :data:`CIRCLE_CORNERS` = 0.45, and ``unknown`` (a rounded square) between.  ``corners`` of a square with
  corner radius r: 1 (r = 0), ~0.88 (r = 1/8 of the side), ~0.61 (1/4), ~0.30 (3/8), 0 (1/2, a circle);
  0.73 lies between 1/8 and 1/4 with room for blur (a sharp square blurred with radius 1 plus noise std 8
  keeps >= 0.84) and 0.45 between 1/4 and 3/8.  The tests (``tests/test_strict_shapes.py``) render these
  rounded squares and irregular blobs with their own rasteriser and state what a person would call them.

Shape, lenient rule (:func:`lenient_shape`, the first rule, reported beside the strict one as
``lenient_fully_correct`` and ``lenient_shape`` for comparison with earlier reports): ``triangle`` when
``asym`` > 0.15, else ``square`` when ``diag`` > 0.8 (square ~1, circle ~1/sqrt(2)), else ``circle``; it
calls a square with corner radius 1/4 of its side (``diag`` ~0.85) a square.

Measured on fresh renders: 100% of 3000 one- and two-object scenes fully correct under both rules; still 100%
after a Gaussian blur of radius 1 plus pixel noise of std 8.  On the built-in tokenizer's own reconstructions
of fresh renders, under the strict rule, some small squares lose their corners (see ``docs/design.md``).

:func:`score` matches expected and detected objects by the assignment with the most correct attributes;
:func:`evaluate` aggregates scores over a set of images.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from vqdiffusion.data.shapes import COLORS, IMAGE_SIZE, POSITION_CELLS, UNKNOWN_SHAPE, Scene, ShapeObject

__all__ = [
    "ATTRIBUTES",
    "CIRCLE_CORNERS",
    "ELONGATION_LIMIT",
    "FOREGROUND_THRESHOLD",
    "MIN_PIXELS",
    "SQUARE_CORNERS",
    "SQUARE_DIAGONAL",
    "TRIANGLE_ASYMMETRY",
    "TRIANGLE_HARMONIC",
    "angular_moments",
    "detect",
    "evaluate",
    "lenient_shape",
    "measure",
    "score",
    "strict_shape",
]

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position")
#: A pixel is foreground when its brightest channel exceeds this (all palette colors peak at >= 220).
FOREGROUND_THRESHOLD = 70.0
#: Components with fewer foreground pixels are ignored as speckle (a small triangle has about 70).
MIN_PIXELS = 12
#: Size threshold on the larger side of the bounding box, px (small ~12, large ~24).
LARGE_THRESHOLD = 18.0
#: Shape thresholds (see the module docstring).  Both rules: a triangle has ``asym`` above this.
TRIANGLE_ASYMMETRY = 0.15
#: Lenient rule: a square has a diagonal chord over this fraction of its side (square ~1, circle ~0.71).
SQUARE_DIAGONAL = 0.8
#: Strict rule: a square has ``corners`` at least this (a square 1, its corners rounded to radius 1/8 of the
#: side ~0.88, 1/4 ~0.61, 3/8 ~0.30, a circle 0).  A sharp data-set square after blur radius 1 + noise std 8
#: keeps >= 0.84; a clean quarter-radius rounded square stays <= 0.67.
SQUARE_CORNERS = 0.73
#: Strict rule: a circle has ``corners`` at most this (between a rounded square of radius 1/4 and 3/8 of the
#: side); between the two thresholds the object is a rounded square: ``unknown``.
CIRCLE_CORNERS = 0.45
#: Strict rule: a circle or square has ``elong`` at most this (an ellipse 1.22 times as wide as tall reads
#: 0.4; the data set's circles and squares stay under 0.1, also blurred); more is an oval or an egg: ``unknown``.
ELONGATION_LIMIT = 0.4
#: Strict rule: a triangle has ``tri`` at least this and a circle or square less (an upward triangle 1, its
#: blurred renders >= 0.8; circles and squares < 0.05).
TRIANGLE_HARMONIC = 0.5
# Coverage is clipped to [0, _MAX_LEVEL]: above 1 so that noise averages out in sums.
_MAX_LEVEL = 1.5

_CELL = IMAGE_SIZE / 3
#: |m_3| / A^2.5 of an upward isosceles triangle as wide as tall (numerical integration on a 2000^2 grid).
_TRIANGLE_M3 = 0.06809
_CELL_TO_POSITION = {cell: name for name, cell in POSITION_CELLS.items()}
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
_DIAGONALS = (_YY + _XX, _XX - _YY + IMAGE_SIZE - 1)
_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A ``[64, 64, 3]`` float32 array in ``[0, 255]``.

    Accepts a PIL image, or an array ``[H, W, 3]`` / ``[3, H, W]`` / ``[H, W]``, uint8 in ``[0, 255]`` or
    float in ``[0, 1]``.
    """
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an RGB image, got an array of shape {np.asarray(image).shape}")
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(array, 0.0, 1.0) * 255.0
        pil = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="RGB")
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: labels (0 = background, 1..n) and n."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        stack = [(int(y0), int(x0))]
        while stack:
            y, x = stack.pop()
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    stack.append((ny, nx))
    return labels, count


def _grow(mask: np.ndarray) -> np.ndarray:
    """Dilation by one pixel (3 x 3 square)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _longest(profile: np.ndarray, taps: int = 3) -> float:
    """The maximum of a profile of row (or column) sums after a moving mean, which averages out noise."""
    return float(np.convolve(profile, np.ones(taps) / taps, mode="valid").max())


def angular_moments(coverage: np.ndarray) -> tuple[float, float, float]:
    """Scale-, rotation- and blur-invariant angular harmonics ``(elong, tri, corners)`` of a coverage map.

    With ``z = (x - mx) + i (y - my)`` about the coverage centroid (pixel centres at ``index + 0.5``) and
    ``A = sum c`` the area, the complex moments ``m_k = sum c z^k`` are normalised by ``A^(k/2 + 1)`` and
    scaled so that a reference shape reads 1:

    * ``elong = 4 pi |m_2| / A^2``: an ellipse with axes ``a >= b`` reads ``a/b - b/a``; circles and squares 0;
    * ``tri = |m_3| / A^2.5`` over its value for an upward isosceles triangle as wide as tall (1);
    * ``corners = 60 |m_4| / A^3``: 1 for a square (any rotation), 0 for a circle.

    ``Re z^k`` and ``Im z^k`` are harmonic polynomials, so a moment is unchanged by an isotropic blur (the
    Gaussian mean of a harmonic function is its value at the centre), and ``m_2..m_4`` of a centrally
    symmetric shape barely move when the centre is off by a fraction of a pixel.  An all-zero map gives zeros.
    """
    area = float(coverage.sum())
    if area <= 0:
        return 0.0, 0.0, 0.0
    ys, xs = np.indices(coverage.shape, dtype=np.float64) + 0.5
    z = (xs - float((coverage * xs).sum()) / area) + 1j * (ys - float((coverage * ys).sum()) / area)
    z2 = z * z
    m2, m3, m4 = (abs(complex((coverage * power).sum())) for power in (z2, z2 * z, z2 * z2))
    return 4 * np.pi * m2 / area**2, m3 / area**2.5 / _TRIANGLE_M3, 60 * m4 / area**3


def lenient_shape(asym: float, diag: float) -> str:
    """The first rule (kept for comparison): triangle by ``asym``, then square when ``diag`` > 0.8, else circle.

    It calls a square with corners rounded to a quarter of its side (``diag`` ~0.85) a square."""
    if asym > TRIANGLE_ASYMMETRY:
        return "triangle"
    return "square" if diag > SQUARE_DIAGONAL else "circle"


def strict_shape(asym: float, elong: float, tri: float, corners: float) -> str:
    """The shape a person would name, from the measures of :func:`measure` (thresholds in the module docstring).

    ``triangle``: bottom-heavy (``asym``) with a triangle's three-fold harmonic (``tri``); ``square``: round in
    neither ``elong`` nor ``tri`` and with square corners (``corners`` >= :data:`SQUARE_CORNERS`); ``circle``:
    likewise with ``corners`` <= :data:`CIRCLE_CORNERS`; anything else (a rounded square, an oval, a lop-sided
    blob, a bottom-heavy blob that is no triangle) is :data:`~vqdiffusion.data.shapes.UNKNOWN_SHAPE`.
    """
    if asym > TRIANGLE_ASYMMETRY:
        return "triangle" if tri >= TRIANGLE_HARMONIC else UNKNOWN_SHAPE
    if elong > ELONGATION_LIMIT or tri >= TRIANGLE_HARMONIC:
        return UNKNOWN_SHAPE
    if corners >= SQUARE_CORNERS:
        return "square"
    if corners <= CIRCLE_CORNERS:
        return "circle"
    return UNKNOWN_SHAPE


def measure(image: Image.Image | np.ndarray) -> list[dict[str, Any]]:
    """Measurements of every non-speckle object in the image, in reading order of their centres.

    Each dict: ``object`` (the :class:`ShapeObject` read, shape by :func:`strict_shape`), ``lenient_object``
    (the same with the shape of :func:`lenient_shape`), ``cx``, ``cy``, ``width``, ``height``, ``area`` (px),
    ``fill``, ``asym``, ``diag``, ``elong``, ``tri``, ``corners`` (:func:`angular_moments`), ``rgb`` (median
    color of the core) and ``pixels`` (foreground pixel count).
    """
    rgb = _to_array(image)
    brightness = rgb.max(axis=2)
    foreground = brightness > FOREGROUND_THRESHOLD
    labels, count = _components(foreground)
    # Noise floor: the background's 90th percentile brightness (0 on a clean render), subtracted from the
    # coverage so that background noise in the rim around an object does not widen it.
    background = brightness[~_grow(_grow(foreground))]
    floor = min(float(np.percentile(background, 90)), FOREGROUND_THRESHOLD / 2) if background.size else 0.0
    results = []
    coords = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    for label in range(1, count + 1):
        component = labels == label
        pixels = int(component.sum())
        if pixels < MIN_PIXELS:
            continue
        interior = component & ~_grow(~component)
        peak = float(np.median(brightness[interior if interior.sum() >= 3 else component]))
        region = _grow(component) & ((labels == 0) | component)
        level = np.clip((brightness - floor) / max(peak - floor, 1.0), 0.0, _MAX_LEVEL)
        coverage = np.where(region, level, 0.0)
        # Bounding box: extent = the longest row / column of coverage (blur and noise keep it), centre =
        # the middle of the column / row maxima profiles (for a triangle the centroid would sit too low).
        width, height = _longest(coverage.sum(axis=1)), _longest(coverage.sum(axis=0))
        area = float(coverage.sum())
        # Longest chord along the two diagonals, in pixels: a square's diagonal holds as many pixels as
        # its side, a circle's only 1/sqrt(2) of its diameter.
        diagonal = max(_longest(np.bincount(k.ravel(), coverage.ravel()), taps=2) for k in _DIAGONALS)
        diag = diagonal / ((width + height) / 2)
        columns, rows = np.minimum(coverage, 1.0).max(axis=0), np.minimum(coverage, 1.0).max(axis=1)
        cx = float((columns * coords).sum() / columns.sum())
        cy = float((rows * coords).sum() / rows.sum())
        # Share of each row above the centre line y = cy (row y covers [y, y + 1)).
        above = np.clip(cy - (coords - 0.5), 0.0, 1.0)
        top = float((coverage.sum(axis=1) * above).sum())
        asym = (area - 2 * top) / area
        fill = area / (width * height)
        # The angular moments take two rings of pixels around the component, where a blur spreads it.
        wide = _grow(_grow(component)) & ((labels == 0) | component)
        elong, tri, corners = angular_moments(np.where(wide, level, 0.0))
        core = component & (coverage > 0.85)
        if core.sum() < 3:
            core = component
        median = np.median(rgb[core], axis=0)
        color = _PALETTE_NAMES[int(np.argmin(((_PALETTE - median) ** 2).sum(axis=1)))]
        size = "large" if max(width, height) > LARGE_THRESHOLD else "small"
        position = _CELL_TO_POSITION[(min(int(cy // _CELL), 2), min(int(cx // _CELL), 2))]
        results.append(
            {
                "object": ShapeObject(strict_shape(asym, elong, tri, corners), color, size, position),
                "lenient_object": ShapeObject(lenient_shape(asym, diag), color, size, position),
                "cx": cx,
                "cy": cy,
                "width": width,
                "height": height,
                "area": area,
                "fill": fill,
                "asym": asym,
                "diag": diag,
                "elong": elong,
                "tri": tri,
                "corners": corners,
                "rgb": tuple(float(v) for v in median),
                "pixels": pixels,
            }
        )
    results.sort(key=lambda r: (POSITION_CELLS[r["object"].position], r["cy"], r["cx"]))
    return results


def detect(image: Image.Image | np.ndarray, *, lenient: bool = False) -> Scene:
    """The objects (shape, color, size, position) seen in a ``shapes`` image, in reading order.

    Shapes by the strict rule (:func:`strict_shape`), or with ``lenient`` by the first one (:func:`lenient_shape`).
    """
    key = "lenient_object" if lenient else "object"
    return Scene(tuple(r[key] for r in measure(image)))


def _matches(a: ShapeObject, b: ShapeObject) -> int:
    return sum(getattr(a, attr) == getattr(b, attr) for attr in ATTRIBUTES)


def _best_assignment(expected: Scene, detected: Scene) -> list[tuple[int, int]]:
    """Pairs (expected index, detected index) of the assignment with the most matching attributes."""
    n_exp, n_det = len(expected.objects), len(detected.objects)
    best: list[tuple[int, int]] = []
    best_total = -1
    if n_exp <= n_det:
        candidates = (list(enumerate(p)) for p in itertools.permutations(range(n_det), n_exp))
    else:
        candidates = ([(e, d) for d, e in enumerate(p)] for p in itertools.permutations(range(n_exp), n_det))
    for pairs in candidates:
        total = sum(_matches(expected.objects[e], detected.objects[d]) for e, d in pairs)
        if total > best_total:
            best, best_total = sorted(pairs), total
    return best


def score(expected: Scene, detected: Scene) -> dict[str, Any]:
    """Compare a detected scene with the expected one.

    Objects are matched by the assignment with the most correct attributes; an expected object left
    unmatched (too few detections) counts as wrong on every attribute.  Returns:

    * ``"shape"``, ``"color"``, ``"size"``, ``"position"``: fraction of expected objects with that attribute
      right (1.0 for an empty expected scene);
    * ``"count"``: whether the number of detected objects equals the number expected;
    * ``"objects_correct"``: how many expected objects have every attribute right;
    * ``"fully_correct"``: the count is right and every expected object has every attribute right;
    * ``"num_expected"``, ``"num_detected"``, ``"matches"`` (pairs of expected and detected indices).
    """
    pairs = _best_assignment(expected, detected)
    matched = dict(pairs)
    n_exp = len(expected.objects)
    correct = {attr: 0 for attr in ATTRIBUTES}
    objects_correct = 0
    for e, obj in enumerate(expected.objects):
        other = detected.objects[matched[e]] if e in matched else None
        right = [other is not None and getattr(obj, attr) == getattr(other, attr) for attr in ATTRIBUTES]
        for attr, ok in zip(ATTRIBUTES, right, strict=True):
            correct[attr] += ok
        objects_correct += all(right)
    count = n_exp == len(detected.objects)
    result: dict[str, Any] = {attr: (correct[attr] / n_exp if n_exp else 1.0) for attr in ATTRIBUTES}
    result.update(
        count=count,
        objects_correct=objects_correct,
        fully_correct=count and objects_correct == n_exp,
        num_expected=n_exp,
        num_detected=len(detected.objects),
        matches=pairs,
    )
    return result


def _summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Rates over the :func:`score` results of a set of images (see :func:`evaluate`)."""
    n_objects = sum(r["num_expected"] for r in results)
    summary = {
        "n": float(len(results)),
        "fully_correct": sum(r["fully_correct"] for r in results) / len(results),
        "count": sum(r["count"] for r in results) / len(results),
    }
    for attr in ATTRIBUTES:
        total = sum(r[attr] * r["num_expected"] for r in results)
        summary[attr] = total / n_objects if n_objects else 1.0
    return summary


def evaluate(images: Iterable[Image.Image | np.ndarray], scenes: Iterable[Scene]) -> dict[str, float]:
    """Detect and score every image against its scene.

    Returns ``"n"`` (images), ``"fully_correct"`` and ``"count"`` (rates over images), and ``"shape"``,
    ``"color"``, ``"size"``, ``"position"`` (accuracies over all expected objects), all with the strict shape
    rule; ``"lenient_fully_correct"`` and ``"lenient_shape"`` are the same two rates with the lenient rule
    (:func:`lenient_shape`), for comparison with reports made before the strict rule.
    """
    strict, lenient = [], []
    for image, scene in zip(images, scenes, strict=True):
        measured = measure(image)
        strict.append(score(scene, Scene(tuple(r["object"] for r in measured))))
        lenient.append(score(scene, Scene(tuple(r["lenient_object"] for r in measured))))
    if not strict:
        raise ValueError("evaluate needs at least one image")
    summary = _summary(strict)
    old = _summary(lenient)
    summary.update(lenient_fully_correct=old["fully_correct"], lenient_shape=old["shape"])
    return summary
