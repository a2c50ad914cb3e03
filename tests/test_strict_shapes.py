"""The shape detector reads rounded squares and blobs the way a person would.

The renders here are drawn by this file's own rasteriser (inside-tests on a 4x supersampled grid, box-filtered
down, as :mod:`vqdiffusion.data.shapes` anti-aliases its objects), and the expected answers are decided from the
geometry alone, before and apart from the detector:

* a square whose corners are rounded with radius r: r < 1/4 of the side is still a square (a person sees a
  square with soft corners); r = 1/4 of the side is a rounded square, which is none of circle, square,
  triangle, so ``unknown``; r >= 3/8 of the side is round enough to be a circle (r = 1/2 *is* a circle);
* an irregular blob (an oval, a peanut, a lumpy or lop-sided outline) is ``unknown``: wrong for any prompt.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vqdiffusion.data.shapes import (
    COLORS,
    SHAPES,
    UNKNOWN_SHAPE,
    Scene,
    ShapeObject,
    canonical_caption,
    render,
)
from vqdiffusion.eval.shapes import detect, evaluate, score

SUPERSAMPLE = 4
SIDES = {"small": 12.0, "large": 24.0}
# (corner radius / side, what a person calls it)
ROUNDED_CASES = [
    (0.0, "square"),
    (1 / 8, "square"),
    (1 / 4, UNKNOWN_SHAPE),
    (3 / 8, "circle"),
    (1 / 2, "circle"),
]


def _grid(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample centres (x, y), in pixels: pixel i covers [i, i + 1)."""
    coords = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    return np.meshgrid(coords, coords)


def _to_image(inside: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Box-filter a supersampled inside-mask down to 64 x 64 and paint it on black: uint8 [64, 64, 3]."""
    n = inside.shape[0] // SUPERSAMPLE
    coverage = inside.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))
    return np.clip(np.rint(coverage[..., None] * np.asarray(color, np.float64)), 0, 255).astype(np.uint8)


def rounded_square(cx: float, cy: float, side: float, radius: float, color: tuple[int, int, int]) -> np.ndarray:
    """An axis-aligned square of ``side`` px centred at (cx, cy) with corners rounded to ``radius`` px."""
    x, y = _grid()
    half = side / 2
    # Distance outside the inner square whose corners are the centres of the corner arcs.
    dx = np.maximum(np.abs(x - cx) - (half - radius), 0.0)
    dy = np.maximum(np.abs(y - cy) - (half - radius), 0.0)
    inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half) & (dx * dx + dy * dy <= radius * radius)
    return _to_image(inside, color)


def polar_blob(
    cx: float, cy: float, radius: float, harmonics: list[tuple[int, float, float]], color: tuple[int, int, int]
) -> np.ndarray:
    """A star-shaped outline r(theta) = radius (1 + sum a cos(k theta + phase)) for (k, a, phase)."""
    x, y = _grid()
    theta = np.arctan2(y - cy, x - cx)
    outline = radius * (1 + sum(a * np.cos(k * theta + phase) for k, a, phase in harmonics))
    return _to_image(np.hypot(x - cx, y - cy) <= outline, color)


def oval(cx: float, cy: float, half_width: float, half_height: float, color: tuple[int, int, int]) -> np.ndarray:
    """An axis-aligned ellipse."""
    x, y = _grid()
    return _to_image(((x - cx) / half_width) ** 2 + ((y - cy) / half_height) ** 2 <= 1, color)


def peanut(cx: float, cy: float, radius: float, color: tuple[int, int, int]) -> np.ndarray:
    """Two overlapping discs of ``radius`` side by side, 1.2 radii apart (a peanut or a bean)."""
    x, y = _grid()
    offset = 0.6 * radius
    inside = (np.hypot(x - cx - offset, y - cy) <= radius) | (np.hypot(x - cx + offset, y - cy) <= radius)
    return _to_image(inside, color)


def _blur_and_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The degradation of the detector's robustness test: Gaussian blur of radius 1, then noise of std 8."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)), np.float64)
    return np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)


def _placements(rng: np.random.Generator, count: int, size: str) -> list[tuple[float, float, float, str]]:
    """``count`` (cx, cy, side, color name): sub-pixel centres near the middle and +-1 px side jitter."""
    names = list(COLORS)
    return [
        (32 + rng.uniform(-5, 5), 32 + rng.uniform(-5, 5), SIDES[size] + rng.uniform(-1, 1), names[i % len(names)])
        for i in range(count)
    ]


def _detected_shapes(image: np.ndarray) -> list[str]:
    return [obj.shape for obj in detect(image).objects]


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize(("fraction", "expected"), ROUNDED_CASES)
def test_rounded_squares_read_as_a_person_would(size, fraction, expected):
    rng = np.random.default_rng(int(fraction * 64) + (100 if size == "large" else 0))
    for cx, cy, side, color in _placements(rng, 24, size):
        image = rounded_square(cx, cy, side, fraction * side, COLORS[color])
        objects = detect(image).objects
        assert len(objects) == 1, (fraction, size, cx, cy, side)
        obj = objects[0]
        assert obj.shape == expected, (fraction, size, cx, cy, side, obj)
        # The other attributes are read as before: colour, size and position stay right.
        assert (obj.color, obj.size, obj.position) == (color, size, "center"), obj


@pytest.mark.parametrize("size", ["small", "large"])
def test_blur_does_not_make_a_rounded_square_a_square(size):
    """Blur softens corners further, so a quarter-side radius or more must not turn into a square."""
    rng = np.random.default_rng(5 if size == "small" else 6)
    for fraction in (1 / 4, 3 / 8, 1 / 2):
        for cx, cy, side, color in _placements(rng, 12, size):
            image = _blur_and_noise(rounded_square(cx, cy, side, fraction * side, COLORS[color]), rng)
            assert _detected_shapes(image) != ["square"], (fraction, size, cx, cy, side)
        # and a sharp square stays a square (the data set's own squares are checked in test_shapes.py)
        cx, cy, side, color = _placements(rng, 1, size)[0]
        assert _detected_shapes(_blur_and_noise(rounded_square(cx, cy, side, 0.0, COLORS[color]), rng)) == ["square"]


def _blobs(rng: np.random.Generator, radius: float) -> dict[str, np.ndarray]:
    """Irregular blobs of about the area of a disc of ``radius`` px, none of them a circle, square or triangle."""
    cx, cy = 32 + rng.uniform(-4, 4), 32 + rng.uniform(-4, 4)
    color = COLORS[list(COLORS)[int(rng.integers(len(COLORS)))]]
    phase = rng.uniform(0, 2 * math.pi)
    return {
        # an oval 1.6 times as wide as it is tall, a peanut, and outlines with wobbles of low order
        "oval": oval(cx, cy, 1.26 * radius, 0.79 * radius, color),
        "peanut": peanut(cx, cy, 0.8 * radius, color),
        "egg": polar_blob(cx, cy, radius, [(2, 0.2, phase), (3, 0.1, 2 * phase)], color),
        "three lobes": polar_blob(cx, cy, radius, [(3, 0.25, phase)], color),
        "lop-sided": polar_blob(cx, cy, radius, [(1, 0.3, phase), (2, 0.15, 3 * phase)], color),
    }


BLOBS = ["oval", "peanut", "egg", "lop-sided",
         pytest.param("three lobes", marks=pytest.mark.xfail(
             reason="known limitation: a three-lobed blob with a lobe down has a triangle's asymmetry and "
             "three-fold harmonic; the rule has no convexity measure", strict=False))]  # fmt: skip


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("blob", BLOBS)
def test_irregular_blobs_are_unknown(size, blob):
    rng = np.random.default_rng(11 if size == "small" else 12)
    radius = SIDES[size] / 2
    for _ in range(8):
        image = _blobs(rng, radius)[blob]
        assert _detected_shapes(image) == [UNKNOWN_SHAPE], (blob, size)


def test_unknown_is_wrong_for_every_prompt_and_never_drawn():
    blob = ShapeObject(UNKNOWN_SHAPE, "red", "small", "top")  # a detected object may carry it
    for shape in SHAPES:
        expected = Scene((ShapeObject(shape, "red", "small", "top"),))
        result = score(expected, Scene((blob,)))
        assert result["shape"] == 0.0 and not result["fully_correct"]
        assert result["color"] == result["size"] == result["position"] == 1.0
    with pytest.raises(ValueError):
        render(Scene((blob,)), np.random.default_rng(0))
    with pytest.raises(ValueError):
        canonical_caption(Scene((blob,)))
    with pytest.raises(ValueError):
        ShapeObject("blob", "red", "small", "top")


def test_evaluate_reports_the_strict_rule_and_the_lenient_one():
    """A quarter-radius rounded square: the lenient (chord) rule took it for a square, the strict one does not;
    a circle and a sharp square are right under both."""
    rng = np.random.default_rng(3)
    cx, cy, side, color = _placements(rng, 1, "small")[0]
    prompt = Scene((ShapeObject("square", color, "small", "center"),))
    rounded = rounded_square(cx, cy, side, side / 4, COLORS[color])
    sharp = rounded_square(cx, cy, side, 0.0, COLORS[color])
    circle = Scene((ShapeObject("circle", "blue", "large", "top left"),))
    summary = evaluate([rounded, sharp, render(circle, rng)], [prompt, prompt, circle])
    assert summary["fully_correct"] == pytest.approx(2 / 3)
    assert summary["shape"] == pytest.approx(2 / 3)
    assert summary["lenient_fully_correct"] == 1.0
    assert summary["lenient_shape"] == 1.0
