"""The synthetic ``shapes`` data set: coloured shapes on black, captioned by a small grammar.

Each image is ``64 x 64`` RGB on a black background with one or two non-overlapping objects.  An object has
four attributes, drawn from a fixed vocabulary (the evaluator in :mod:`vqdiffusion.eval.shapes` and outside
checks rely on it, so it must not change):

* shape: ``circle``, ``square``, ``triangle`` (isosceles, pointing up);
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
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .shape_captions import (
    OBJECT_TEMPLATES,
    SIZE_WORDS,
    TWO_OBJECT_TEMPLATES,
    canonical_caption,
    caption,
    parse_caption,
)
from .shape_vocab import (
    COLORS,
    HELD_OUT_PAIRS,
    POSITION_CELLS,
    POSITIONS,
    PROMPT_SETS,
    SHAPES,
    SIZE_PIXELS,
    SIZES,
    SPLITS,
    UNKNOWN_SHAPE,
    Scene,
    ShapeObject,
)

__all__ = [
    "UNKNOWN_SHAPE",
    "CELL_MARGIN",
    "SIZE_WORDS",
    "TWO_OBJECT_TEMPLATES",
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
# Data set files
# ---------------------------------------------------------------------------------------------------------


#: The most images :func:`make_dataset` writes in one call (a few hours of writing at most).
MAX_DATASET_IMAGES = 10_000_000
#: A generous size on disk of one image of the data set: its PNG, caption file and metadata line.
_BYTES_PER_IMAGE = 4096


def _check_disk_space(out: Path, n: int) -> None:
    """OSError-free refusal (ValueError) of a data set larger than the free space of ``out``'s disk."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if n * _BYTES_PER_IMAGE > free:
        raise ValueError(
            f"{n} images need about {n * _BYTES_PER_IMAGE / 1e9:.1f} GB but {existing} has {free / 1e9:.1f} GB "
            "free; ask for fewer images or choose another disk"
        )


_DATASET_FILE = re.compile(r"^\d+\.(png|txt)$|^metadata\.jsonl$")


def _remove_previous_dataset(out: Path) -> None:
    """The files of an earlier data set in ``out`` (``NNNNN.png``, ``NNNNN.txt``, ``metadata.jsonl``): an
    overwritten set must not keep images beyond its own ``n``.  Other files are left alone."""
    for path in out.iterdir():
        if _DATASET_FILE.match(path.name) and path.is_file():
            path.unlink()


def make_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    split: str = "train",
    two_object_fraction: float = DEFAULT_TWO_OBJECT_FRACTION,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` images with captions to ``out_dir``, deterministic by ``seed``.

    Files: ``00000.png`` + ``00000.txt`` (a random paraphrase, one line) per image, and ``metadata.jsonl``
    with one line per image: ``{"file", "caption", "canonical", "objects": [{shape, color, size, position,
    bbox}]}`` (``bbox`` is ``[x0, y0, x1, y1]`` in pixels).  Scenes have two objects with probability
    ``two_object_fraction`` (the ``"heldout"`` split always has one).  Returns the folder.  Every argument
    is checked before anything is written: at most :data:`MAX_DATASET_IMAGES` images, which must fit on the
    disk; a folder that is not empty is refused unless ``overwrite``.
    """
    from ..io import check_new_folder

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > MAX_DATASET_IMAGES:
        raise ValueError(
            f"{n} images are above the limit of {MAX_DATASET_IMAGES} for one data set (writing them would take "
            "days); ask for fewer (make-shapes --n)"
        )
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, {2**63 - 1}], got {seed}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    _allowed_pairs(split)  # validates the split
    out = check_new_folder(out_dir, overwrite=overwrite, what="the data set folder")
    _check_disk_space(out, n)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_dataset(out)
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
