"""Captions of shapes scenes: templated English phrases (:func:`caption`, :func:`canonical_caption`) and
their parser (:func:`parse_caption`), which reads back what a caption names."""

from __future__ import annotations

import re

import numpy as np

from .shape_vocab import COLORS, SHAPES, Scene, ShapeObject

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
