"""The shapes data set's vocabulary (shapes, colours, sizes, positions, splits) and its scenes, shared by
the renderer (:mod:`vqdiffusion.data.shapes`) and the captions (:mod:`vqdiffusion.data.shape_captions`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: The shape of a detected object that is none of :data:`SHAPES` (a blob, an oval, a rounded square): a
#: :class:`ShapeObject` may carry it, but it is never rendered, captioned or drawn by ``sample_scene``, so
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


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape`` in :data:`SHAPES`, ``color`` in :data:`COLORS`, ``size`` in :data:`SIZES`,
    ``position`` in :data:`POSITIONS`.  Out-of-vocabulary values raise ``ValueError``."""

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
