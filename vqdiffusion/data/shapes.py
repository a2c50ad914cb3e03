"""The synthetic ``shapes`` data set: coloured shapes on black, captioned by a small grammar.

Each image is ``64 x 64`` RGB on a black background with one or two non-overlapping objects.  An object has
four attributes, drawn from a fixed vocabulary (the evaluator in :mod:`vqdiffusion.eval.shapes` and outside
checks rely on it, so it must not change):

* shape: ``circle``, ``square``, ``triangle`` (isosceles, pointing up); the evaluator may also read an object
  as :data:`UNKNOWN_SHAPE` (none of them), which is never drawn, captioned or prompted;
* color: the eight names of :data:`COLORS` with their exact RGB values;
* size: ``small`` (bounding box about 12 px) or ``large`` (about 24 px), see :data:`SIZE_PIXELS`;
* position: the cell of a 3 x 3 grid holding the centre of the object's bounding box, see :data:`POSITIONS`.

Rendering is anti-aliased (each object is drawn at 4x and box-filtered down) with a small jitter of position
(within :data:`POSITION_JITTER` px of the cell's nominal point) and size (:data:`SIZE_JITTER` px).  Object
centres always stay at least :data:`CELL_MARGIN` px inside their cell, objects stay at least :data:`EDGE_PAD`
px inside the image, and two objects are in different cells with at least :data:`MIN_GAP` px of black
between them, so every label can be read back from the image unambiguously.

Splits.  ``"train"`` never contains a color-shape pair of :data:`HELD_OUT_PAIRS` (every purple triangle and
every cyan square is held out); ``"heldout"`` is single objects of exactly those pairs, for measuring
compositional generalisation; ``"all"`` draws from every pair.

Captions (all lower case).  One object is described by one of :data:`OBJECT_TEMPLATES`, for example::

    a large red circle in the top left          (canonical, template 0)
    top left: a big red circle                  (template 1)
    a red circle, large, at the top left corner (template 2)
    there is a big red circle at the top left   (template 3)
    in the top left corner, a large red circle  (template 4)
    a red circle of large size in the top left  (template 5)

Size words have synonyms (``small``/``little``, ``large``/``big``) and the position phrase of templates
0, 2, 3, 5 varies (``in the top left``, ``at the top left``, ``in the top left corner``, ``at the top edge``,
``on the left side``, ``in the middle`` ...).  Two objects are joined by ``and`` (one template per caption),
optionally after the prefix ``two shapes:``.  :func:`parse_caption` reads back every caption the grammar
produces; any out-of-vocabulary word makes it return ``None``.

:func:`make_dataset` writes ``00000.png`` + ``00000.txt`` pairs (the same-named caption layout read by
:class:`vqdiffusion.data.folders.ImageCaptionFolder`) and a ``metadata.jsonl`` with the true attributes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

__all__ = [
    "CELL_MARGIN",
    "COLORS",
    "EDGE_PAD",
    "HELD_OUT_PAIRS",
    "IMAGE_SIZE",
    "MIN_GAP",
    "OBJECT_TEMPLATES",
    "POSITIONS",
    "POSITION_CELLS",
    "POSITION_JITTER",
    "PROMPT_SETS",
    "SHAPES",
    "SIZES",
    "SIZE_JITTER",
    "SIZE_PIXELS",
    "SPLITS",
    "UNKNOWN_SHAPE",
    "Placement",
    "Scene",
    "ShapeObject",
    "canonical_caption",
    "caption",
    "is_feasible",
    "layout",
    "make_dataset",
    "parse_caption",
    "prompt_set",
    "render",
    "sample_scene",
]

# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: The shape of a detected object that is none of :data:`SHAPES` (a blob, an oval, a rounded square): a
#: :class:`ShapeObject` may carry it, but it is never rendered, captioned or drawn by :func:`sample_scene`, so
#: it is wrong for every prompt.
UNKNOWN_SHAPE = "unknown"
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
#: Nominal side of an object's bounding box in pixels of a 64 x 64 image.
SIZE_PIXELS: dict[str, float] = {"small": 12.0, "large": 24.0}
#: Position name -> (row, column) of its cell in the 3 x 3 grid.
POSITION_CELLS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
POSITIONS: tuple[str, ...] = tuple(POSITION_CELLS)
#: (color, shape) pairs never seen in the ``"train"`` split.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("cyan", "square")})
SPLITS: tuple[str, ...] = ("train", "heldout", "all")
PROMPT_SETS: tuple[str, ...] = ("single_seen", "two_objects", "heldout")

# Geometry, in pixels of a 64 x 64 image (other sizes scale it).
IMAGE_SIZE = 64
CELL = IMAGE_SIZE / 3
#: Minimum distance of an object's centre from its cell's border.
CELL_MARGIN = 3.5
#: Minimum distance of an object's bounding box from the image border.
EDGE_PAD = 1.5
#: Maximum offset of an object's centre from its cell's nominal point, per axis.
POSITION_JITTER = 5.0
#: Maximum change of an object's side from its nominal size.
SIZE_JITTER = 1.0
#: Minimum number of fully black pixels between two objects (chessboard distance).
MIN_GAP = 3
_SUPERSAMPLE = 4
_LAYOUT_TRIES = 50
_SAMPLE_TRIES = 1000
DEFAULT_TWO_OBJECT_FRACTION = 0.3


# ---------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape`` in :data:`SHAPES` (or :data:`UNKNOWN_SHAPE`, for a detected object only),
    ``color`` in :data:`COLORS`, ``size`` in :data:`SIZES`, ``position`` in :data:`POSITIONS`.
    Out-of-vocabulary values raise ``ValueError``."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, (*SHAPES, UNKNOWN_SHAPE)),
            ("color", self.color, COLORS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {tuple(allowed)}, got {value!r}")

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """The objects of one image, in caption order (a detected scene may have any number, even none)."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        if not all(isinstance(obj, ShapeObject) for obj in objects):
            raise TypeError("Scene.objects must be ShapeObject instances")
        object.__setattr__(self, "objects", objects)

    def __len__(self) -> int:
        return len(self.objects)

    def to_list(self) -> list[dict[str, str]]:
        """The objects as JSON-ready dicts."""
        return [obj.to_dict() for obj in self.objects]

    @classmethod
    def from_list(cls, items: list[dict[str, Any]]) -> Scene:
        """Inverse of :meth:`to_list` (extra keys such as ``"bbox"`` are ignored)."""
        return cls(tuple(ShapeObject(d["shape"], d["color"], d["size"], d["position"]) for d in items))


def _allowed_pairs(split: str) -> list[tuple[str, str]]:
    """(color, shape) pairs of a split."""
    every = [(color, shape) for color in COLORS for shape in SHAPES]
    if split == "train":
        return [pair for pair in every if pair not in HELD_OUT_PAIRS]
    if split == "heldout":
        return sorted(HELD_OUT_PAIRS)
    if split == "all":
        return every
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_scene(rng: np.random.Generator, *, num_objects: int | None = None, split: str = "train") -> Scene:
    """Draw a random scene that can be rendered (see :func:`is_feasible`).

    Args:
        rng: the random generator (the only source of randomness).
        num_objects: 1 or 2; ``None`` draws 2 with probability 0.3 (always 1 for ``split="heldout"``).
        split: ``"train"`` (no held-out color-shape pair), ``"heldout"`` (one object of a held-out pair) or
            ``"all"``.
    """
    pairs = _allowed_pairs(split)
    if num_objects is None:
        num_objects = 1 if split == "heldout" else (2 if rng.random() < DEFAULT_TWO_OBJECT_FRACTION else 1)
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    if split == "heldout" and num_objects != 1:
        raise ValueError("the heldout split has single objects only")
    for _ in range(_SAMPLE_TRIES):
        objects = []
        for position in rng.choice(len(POSITIONS), size=num_objects, replace=False):
            color, shape = pairs[int(rng.integers(len(pairs)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            objects.append(ShapeObject(shape, color, size, POSITIONS[int(position)]))
        scene = Scene(tuple(objects))
        if is_feasible(scene):
            return scene
    raise RuntimeError("could not sample a feasible scene")  # pragma: no cover - practically impossible


def prompt_set(name: str, n: int, seed: int) -> list[Scene]:
    """``n`` evaluation scenes, deterministic by ``seed``.

    ``"single_seen"``: one object of a pair seen in training; ``"two_objects"``: two objects of seen pairs;
    ``"heldout"``: one object of a held-out pair.  Use :func:`canonical_caption` or :func:`caption` for text.
    """
    settings = {"single_seen": (1, "train"), "two_objects": (2, "train"), "heldout": (1, "heldout")}
    if name not in settings:
        raise ValueError(f"prompt set must be one of {PROMPT_SETS}, got {name!r}")
    num_objects, split = settings[name]
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, num_objects=num_objects, split=split) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Layout and rendering
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where an object is drawn: centre ``(cx, cy)`` and side ``extent`` of its bounding box, in pixels
    of the rendered image (continuous coordinates: pixel ``i`` covers ``[i, i + 1)``)."""

    obj: ShapeObject
    cx: float
    cy: float
    extent: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``."""
        half = self.extent / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


def _window(index: int, size: str) -> tuple[float, float, float]:
    """(low, high, nominal) of an object centre's coordinate on one axis, 64-pixel units."""
    half = (SIZE_PIXELS[size] + SIZE_JITTER) / 2
    cell_low, cell_high = index * CELL, (index + 1) * CELL
    low = max(cell_low + CELL_MARGIN, half + EDGE_PAD)
    high = min(cell_high - CELL_MARGIN, IMAGE_SIZE - half - EDGE_PAD)
    nominal = min(max((cell_low + cell_high) / 2, low), high)
    return max(low, nominal - POSITION_JITTER), min(high, nominal + POSITION_JITTER), nominal


def placement_coverage(placement: Placement, size: int) -> np.ndarray:
    """Anti-aliased coverage in ``[0, 1]``, ``[size, size]`` float32, of one placed object."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * scale for v in placement.bbox)
    # PIL fills the pixels whose centres (integer coordinates) lie in the shape: shift by half a pixel.
    shape = placement.obj.shape
    if shape == "square":
        draw.rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=255)
    elif shape == "circle":
        draw.ellipse([x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5], fill=255)
    else:
        mid = (x0 + x1) / 2
        draw.polygon([(mid - 0.5, y0 - 0.5), (x1 - 0.5, y1 - 0.5), (x0 - 0.5, y1 - 0.5)], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a ``(2 radius + 1)`` square."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for shift in range(1, radius + 1):
            for sign in (1, -1):
                rolled = np.roll(out, sign * shift, axis=axis)
                edge = [slice(None), slice(None)]
                edge[axis] = slice(0, shift) if sign > 0 else slice(-shift, None)
                rolled[tuple(edge)] = False
                grown |= rolled
        out = grown
    return out


def placements_separated(placements: list[Placement]) -> bool:
    """Whether every two objects have at least :data:`MIN_GAP` black pixels between them (64-px units)."""
    masks = [placement_coverage(p, IMAGE_SIZE) > 0 for p in placements]
    for a, b in itertools.combinations(range(len(masks)), 2):
        if (_dilate(masks[a], MIN_GAP) & masks[b]).any():
            return False
    return True


def _extreme(scene: Scene, extents: list[float]) -> list[Placement]:
    """The placement pushing objects apart as far as their windows allow."""
    cells = [POSITION_CELLS[obj.position] for obj in scene.objects]
    placements = []
    for k, obj in enumerate(scene.objects):
        centre = []
        for axis in (1, 0):  # x from the column, y from the row
            low, high, nominal = _window(cells[k][axis], obj.size)
            others = [cells[j][axis] for j in range(len(cells)) if j != k]
            mean = float(np.mean(others)) if others else cells[k][axis]
            centre.append(low if cells[k][axis] < mean else high if cells[k][axis] > mean else nominal)
        placements.append(Placement(obj, centre[0], centre[1], extents[k]))
    return placements


def is_feasible(scene: Scene) -> bool:
    """Whether :func:`render` can lay the scene out: objects in distinct cells that can be kept
    :data:`MIN_GAP` px apart at their largest size."""
    positions = [obj.position for obj in scene.objects]
    if len(set(positions)) != len(positions):
        return False
    if len(positions) < 2:
        return True
    return placements_separated(_extreme(scene, [SIZE_PIXELS[obj.size] + SIZE_JITTER for obj in scene.objects]))


def layout(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Placement, ...]:
    """Jittered placements of the scene's objects for a ``size`` x ``size`` image.

    Position and size are drawn from ``rng``; overlapping draws are retried, falling back to the
    pushed-apart placement.  Raises ``ValueError`` when the scene is not :func:`is_feasible`.
    """
    if any(obj.shape not in SHAPES for obj in scene.objects):
        raise ValueError(f"only shapes of {SHAPES} can be rendered, got {scene}")
    if not is_feasible(scene):
        raise ValueError(f"scene cannot be rendered without overlap or shared cells: {scene}")
    placements: list[Placement] = []
    for attempt in range(_LAYOUT_TRIES):
        placements = []
        for obj in scene.objects:
            row, col = POSITION_CELLS[obj.position]
            extent = SIZE_PIXELS[obj.size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
            x_low, x_high, _ = _window(col, obj.size)
            y_low, y_high, _ = _window(row, obj.size)
            placements.append(Placement(obj, rng.uniform(x_low, x_high), rng.uniform(y_low, y_high), extent))
        if len(placements) < 2 or placements_separated(placements):
            break
        if attempt == _LAYOUT_TRIES - 1:
            placements = _extreme(scene, [p.extent for p in placements])
    scale = size / IMAGE_SIZE
    return tuple(Placement(p.obj, p.cx * scale, p.cy * scale, p.extent * scale) for p in placements)


def draw_placements(placements: tuple[Placement, ...], size: int) -> Image.Image:
    image = np.zeros((size, size, 3), dtype=np.float32)
    for placement in placements:
        image += placement_coverage(placement, size)[..., None] * np.asarray(COLORS[placement.obj.color], np.float32)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image (deterministic given the state of ``rng``)."""
    return draw_placements(layout(scene, rng, size), size)


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------

#: One-object phrase templates: ``{a}``/``{a_color}`` the article of the next word, ``{size}`` a size word
#: or synonym, ``{size_name}`` the size name, ``{where}`` a position phrase, ``{pos}`` the bare position
#: name.  Template 0 is the canonical form.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {size} {color} {shape} {where}",
    "{pos}: {a} {size} {color} {shape}",
    "{a_color} {color} {shape}, {size}, {where}",
    "there is {a} {size} {color} {shape} {where}",
    "{where}, {a} {size} {color} {shape}",
    "{a_color} {color} {shape} of {size_name} size {where}",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = ("{0} and {1}", "{0}, and {1}", "two shapes: {0} and {1}")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
_CORNERS = ("top left", "top right", "bottom left", "bottom right")


def _position_phrases(position: str) -> tuple[str, ...]:
    """Every phrase naming a position; the first is canonical."""
    phrases = [f"in the {position}", f"at the {position}"]
    if position in _CORNERS:
        phrases += [f"in the {position} corner", f"at the {position} corner"]
    elif position in ("top", "bottom"):
        phrases += [f"at the {position} edge", f"along the {position}"]
    elif position in ("left", "right"):
        phrases += [f"on the {position} side", f"on the {position}"]
    else:
        phrases += ["in the middle", "at the centre"]
    return tuple(phrases)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: ShapeObject, template: int, size_word: str, where: str) -> str:
    if obj.shape not in SHAPES:
        raise ValueError(f"only shapes of {SHAPES} can be captioned, got {obj.shape!r}")
    return OBJECT_TEMPLATES[template].format(
        a=_article(size_word),
        a_color=_article(obj.color),
        size=size_word,
        size_name=obj.size,
        color=obj.color,
        shape=obj.shape,
        where=where,
        pos=obj.position,
    )


def canonical_caption(scene: Scene) -> str:
    """``"a large red circle in the top left"``; several objects are joined by ``" and "``."""
    return " and ".join(_object_phrase(obj, 0, obj.size, f"in the {obj.position}") for obj in scene.objects)


def caption(scene: Scene, rng: np.random.Generator, *, template: int | None = None) -> str:
    """A random paraphrase of the scene (``template`` fixes the index into :data:`OBJECT_TEMPLATES`)."""
    if not scene.objects:
        raise ValueError("cannot caption an empty scene")
    if template is None:
        template = int(rng.integers(len(OBJECT_TEMPLATES)))
    if not 0 <= template < len(OBJECT_TEMPLATES):
        raise ValueError(f"template must be in [0, {len(OBJECT_TEMPLATES)}), got {template}")
    phrases = []
    for obj in scene.objects:
        words = SIZE_WORDS[obj.size]
        where_options = _position_phrases(obj.position)
        size_word = words[int(rng.integers(len(words)))]
        where = where_options[int(rng.integers(len(where_options)))]
        phrases.append(_object_phrase(obj, template, size_word, where))
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return TWO_OBJECT_TEMPLATES[int(rng.integers(len(TWO_OBJECT_TEMPLATES)))].format(*phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_SIZE_LOOKUP = {word: size for size, words in SIZE_WORDS.items() for word in words}
_POSITION_WORDS = {"top", "bottom", "left", "right", "center", "centre", "middle"}
_FILLERS = {
    "a", "an", "the", "in", "at", "on", "of", "along", "there", "is", "size",
    "corner", "edge", "side", "two", "shapes",
}  # fmt: skip


def _parse_object(tokens: list[str]) -> ShapeObject | None:
    found: dict[str, str] = {}

    def put(key: str, value: str) -> bool:
        if key in found:
            return False
        found[key] = value
        return True

    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in ("top", "bottom") and i + 1 < len(tokens) and tokens[i + 1] in ("left", "right"):
            ok = put("position", f"{token} {tokens[i + 1]}")
            i += 1
        elif token in _POSITION_WORDS:
            ok = put("position", "center" if token in ("centre", "middle") else token)
        elif token in _SIZE_LOOKUP:
            ok = put("size", _SIZE_LOOKUP[token])
        elif token in COLORS:
            ok = put("color", token)
        elif token in SHAPES:
            ok = put("shape", token)
        else:
            ok = token in _FILLERS
        if not ok:
            return None
        i += 1
    if len(found) != 4:
        return None
    return ShapeObject(found["shape"], found["color"], found["size"], found["position"])


def parse_caption(text: str) -> Scene | None:
    """Recover the scene from a caption of the grammar; ``None`` for anything else.

    Objects are separated by ``and``; each must name exactly one shape, color, size and position, and every
    other word must be one of the grammar's filler words.
    """
    tokens = re.sub(r"[,:;.!]", " ", text.lower()).split()
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token == "and":
            segments.append([])
        else:
            segments[-1].append(token)
    objects = []
    for segment in segments:
        obj = _parse_object(segment)
        if obj is None:
            return None
        objects.append(obj)
    return Scene(tuple(objects))


# ---------------------------------------------------------------------------------------------------------
# Data set files
# ---------------------------------------------------------------------------------------------------------


def make_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    split: str = "train",
    two_object_fraction: float = DEFAULT_TWO_OBJECT_FRACTION,
) -> Path:
    """Write ``n`` images with captions to ``out_dir``, deterministic by ``seed``.

    Files: ``00000.png`` + ``00000.txt`` (a random paraphrase, one line) per image, and ``metadata.jsonl``
    with one line per image: ``{"file", "caption", "canonical", "objects": [{shape, color, size, position,
    bbox}]}`` (``bbox`` is ``[x0, y0, x1, y1]`` in pixels).  Scenes have two objects with probability
    ``two_object_fraction`` (the ``"heldout"`` split always has one).  Returns the folder.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    _allowed_pairs(split)  # validates the split
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = max(5, len(str(max(n - 1, 0))))
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for index in tqdm(range(n), desc="shapes", disable=n < 1000):
            two = split != "heldout" and rng.random() < two_object_fraction
            scene = sample_scene(rng, num_objects=2 if two else 1, split=split)
            placements = layout(scene, rng)
            text = caption(scene, rng)
            stem = f"{index:0{width}d}"
            draw_placements(placements, IMAGE_SIZE).save(out / f"{stem}.png")
            (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
            objects = [{**p.obj.to_dict(), "bbox": [round(v, 2) for v in p.bbox]} for p in placements]
            record = {
                "file": f"{stem}.png",
                "caption": text,
                "canonical": canonical_caption(scene),
                "objects": objects,
            }
            meta.write(json.dumps(record) + "\n")
    return out
