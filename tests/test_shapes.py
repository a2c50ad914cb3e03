"""The synthetic shapes data set (vocabulary, splits, captions, rendering, files) and its evaluator."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vqdiffusion.data import shapes
from vqdiffusion.data.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    OBJECT_TEMPLATES,
    POSITION_CELLS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    canonical_caption,
    caption,
    is_feasible,
    layout,
    make_dataset,
    parse_caption,
    prompt_set,
    render,
    sample_scene,
)
from vqdiffusion.eval.shapes import detect, evaluate, score


def scene(*objects: tuple[str, str, str, str]) -> Scene:
    return Scene(tuple(ShapeObject(*obj) for obj in objects))


# ---------------------------------------------------------------------------------------------------------
# Vocabulary and splits
# ---------------------------------------------------------------------------------------------------------


def test_vocabulary_is_exactly_the_promised_one():
    assert SHAPES == ("circle", "square", "triangle")
    assert COLORS == {
        "red": (220, 40, 40),
        "green": (40, 180, 60),
        "blue": (40, 80, 220),
        "yellow": (230, 210, 40),
        "purple": (150, 60, 200),
        "orange": (240, 140, 30),
        "cyan": (40, 200, 210),
        "white": (240, 240, 240),
    }
    assert SIZES == ("small", "large")
    assert shapes.SIZE_PIXELS == {"small": 12.0, "large": 24.0}
    assert POSITIONS == (
        "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
    )  # fmt: skip
    assert {POSITION_CELLS[p] for p in POSITIONS} == {(r, c) for r in range(3) for c in range(3)}
    assert POSITION_CELLS["top right"] == (0, 2) and POSITION_CELLS["bottom left"] == (2, 0)
    assert sorted(HELD_OUT_PAIRS) == [("cyan", "square"), ("purple", "triangle")]
    assert isinstance(HELD_OUT_PAIRS, frozenset)


def test_out_of_vocabulary_objects_are_rejected():
    with pytest.raises(ValueError):
        ShapeObject("hexagon", "red", "small", "top")
    with pytest.raises(ValueError):
        ShapeObject("circle", "pink", "small", "top")
    with pytest.raises(ValueError):
        ShapeObject("circle", "red", "medium", "top")
    with pytest.raises(ValueError):
        ShapeObject("circle", "red", "small", "middle")
    obj = ShapeObject("circle", "red", "small", "top")
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.color = "blue"  # type: ignore[misc]


def test_held_out_pairs_never_in_train_and_only_in_heldout():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        for obj in sample_scene(rng, split="train").objects:
            assert (obj.color, obj.shape) not in HELD_OUT_PAIRS
            seen.add((obj.color, obj.shape))
    assert len(seen) == len(COLORS) * len(SHAPES) - len(HELD_OUT_PAIRS)  # every other pair does occur
    heldout = [sample_scene(rng, split="heldout") for _ in range(200)]
    assert all(len(s.objects) == 1 for s in heldout)
    assert {(s.objects[0].color, s.objects[0].shape) for s in heldout} == HELD_OUT_PAIRS
    with pytest.raises(ValueError):
        sample_scene(rng, num_objects=2, split="heldout")
    with pytest.raises(ValueError):
        sample_scene(rng, split="test")


def test_sample_scene_counts_and_distinct_cells():
    rng = np.random.default_rng(1)
    counts = [len(sample_scene(rng).objects) for _ in range(1000)]
    assert set(counts) == {1, 2} and 0.2 < counts.count(2) / 1000 < 0.4
    for _ in range(300):
        two = sample_scene(rng, num_objects=2)
        assert len(two.objects) == 2 and two.objects[0].position != two.objects[1].position
        assert is_feasible(two)
    with pytest.raises(ValueError):
        sample_scene(rng, num_objects=3)


def test_prompt_sets():
    single = prompt_set("single_seen", 50, seed=3)
    assert len(single) == 50 and all(len(s.objects) == 1 for s in single)
    assert all((s.objects[0].color, s.objects[0].shape) not in HELD_OUT_PAIRS for s in single)
    two = prompt_set("two_objects", 50, seed=3)
    assert all(len(s.objects) == 2 for s in two)
    assert all((o.color, o.shape) not in HELD_OUT_PAIRS for s in two for o in s.objects)
    held = prompt_set("heldout", 50, seed=3)
    assert all(len(s.objects) == 1 for s in held)
    assert all((s.objects[0].color, s.objects[0].shape) in HELD_OUT_PAIRS for s in held)
    assert prompt_set("two_objects", 20, seed=9) == prompt_set("two_objects", 20, seed=9)
    assert prompt_set("two_objects", 20, seed=9) != prompt_set("two_objects", 20, seed=10)
    with pytest.raises(ValueError):
        prompt_set("unknown", 5, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------


def test_canonical_caption_form():
    one = scene(("circle", "red", "large", "top left"))
    assert canonical_caption(one) == "a large red circle in the top left"
    two = scene(("circle", "red", "large", "top left"), ("triangle", "orange", "small", "bottom"))
    expected = "a large red circle in the top left and a small orange triangle in the bottom"
    assert canonical_caption(two) == expected
    assert parse_caption(canonical_caption(two)) == two


def test_spec_example_captions_parse():
    expected = scene(("circle", "red", "large", "top left"))
    for text in (
        "a large red circle in the top left",
        "top left: a big red circle",
        "a red circle, large, at the top left corner",
        "A Large Red Circle in the Top Left.",
    ):
        assert parse_caption(text) == expected, text
    assert parse_caption("a small cyan square in the middle") == scene(("square", "cyan", "small", "center"))


@pytest.mark.parametrize("template", range(len(OBJECT_TEMPLATES)))
def test_every_template_parses_back(template):
    rng = np.random.default_rng(template)
    texts = set()
    for position in POSITIONS:  # every position phrase variant of every position
        for obj_shape in SHAPES:
            for color in COLORS:
                for size in SIZES:
                    one = scene((obj_shape, color, size, position))
                    for _ in range(2):
                        text = caption(one, rng, template=template)
                        texts.add(text)
                        assert parse_caption(text) == one, text
    assert len(texts) > 300
    for _ in range(300):
        two = sample_scene(rng, num_objects=2, split="all")
        text = caption(two, rng, template=template)
        assert " and " in text
        assert parse_caption(text) == two, text


def test_random_captions_use_every_template_and_parse():
    rng = np.random.default_rng(5)
    starts = set()
    for _ in range(500):
        s = sample_scene(rng, split="all")
        text = caption(s, rng)
        starts.add(text.split()[0])
        assert parse_caption(text) == s, text
    assert {"a", "an", "there", "two", "in", "at"} <= starts


def test_parse_rejects_out_of_vocabulary_and_incomplete_text():
    for text in (
        "a large pink circle in the top left",
        "a large red hexagon in the top left",
        "a large red circle in the top left next to a tree",
        "a red circle in the top left",  # no size
        "a large red circle",  # no position
        "a large red blue circle in the top left",  # two colors
        "a large red circle in the top left and",
        "",
    ):
        assert parse_caption(text) is None, text


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def test_render_is_deterministic_by_seed():
    s = scene(("circle", "red", "large", "top left"), ("triangle", "white", "small", "bottom right"))
    a = render(s, np.random.default_rng(11))
    b = render(s, np.random.default_rng(11))
    c = render(s, np.random.default_rng(12))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))  # jitter differs
    assert render(s, np.random.default_rng(11), size=128).size == (128, 128)


def test_render_colors_background_and_antialiasing():
    s = scene(("square", "purple", "large", "center"))
    array = np.asarray(render(s, np.random.default_rng(0))).reshape(-1, 3)
    colors = {tuple(int(v) for v in px) for px in array}
    assert (0, 0, 0) in colors and COLORS["purple"] in colors
    partial = [c for c in colors if c not in ((0, 0, 0), COLORS["purple"])]
    assert partial  # anti-aliased edge pixels
    assert (array == 0).all(axis=1).mean() > 0.8


def _cell_of(x: float, y: float, size: int) -> tuple[int, int]:
    return (int(y // (size / 3)), int(x // (size / 3)))


@pytest.mark.parametrize("size", [64, 96])
def test_objects_in_their_cell_inside_image_and_apart(size):
    rng = np.random.default_rng(21)
    for _ in range(300):
        s = sample_scene(rng, num_objects=2 if rng.random() < 0.6 else 1, split="all")
        placements = layout(s, rng, size=size)
        for p in placements:
            x0, y0, x1, y1 = p.bbox
            assert min(x0, y0) > 0 and max(x1, y1) < size
            assert _cell_of(p.cx, p.cy, size) == POSITION_CELLS[p.obj.position]
            margin = shapes.CELL_MARGIN * size / 64 - 1e-9  # centre well inside its cell
            row, col = POSITION_CELLS[p.obj.position]
            assert col * size / 3 + margin <= p.cx <= (col + 1) * size / 3 - margin
            assert row * size / 3 + margin <= p.cy <= (row + 1) * size / 3 - margin
            nominal = shapes.SIZE_PIXELS[p.obj.size] * size / 64
            assert abs(p.extent - nominal) <= shapes.SIZE_JITTER * size / 64 + 1e-9
        if len(placements) == 2:
            # Non-overlap on the real render: pixels of the two objects are well apart.
            image = np.asarray(shapes.draw_placements(placements, size)).any(axis=2)
            a = shapes.placement_coverage(placements[0], size) > 0
            b = shapes.placement_coverage(placements[1], size) > 0
            assert not (a & b).any()
            assert np.array_equal(image, a | b)
            ya, xa = np.nonzero(a)
            yb, xb = np.nonzero(b)
            gap = np.maximum(np.abs(ya[:, None] - yb[None]), np.abs(xa[:, None] - xb[None])).min()
            assert gap > shapes.MIN_GAP * size / 64 - 1


def test_infeasible_scenes_are_refused():
    same_cell = scene(("circle", "red", "small", "top"), ("square", "blue", "small", "top"))
    assert not is_feasible(same_cell)
    with pytest.raises(ValueError):
        render(same_cell, np.random.default_rng(0))
    crowded = scene(("square", "red", "large", "left"), ("square", "blue", "large", "center"))
    assert not is_feasible(crowded)
    assert is_feasible(scene(("square", "red", "large", "left"), ("square", "blue", "large", "right")))


# ---------------------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------------------


def test_detector_accuracy_on_fresh_renders():
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng, num_objects=1 + i % 2, split="all") for i in range(1000)]
    images = [render(s, rng) for s in scenes]
    result = evaluate(images, scenes)
    assert result["n"] == 1000
    assert result["fully_correct"] >= 0.995, result
    for key in ("count", "shape", "color", "size", "position"):
        assert result[key] >= 0.995, (key, result)


def test_detector_tolerates_blur_noise_and_speckle():
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng, num_objects=1 + i % 2, split="all") for i in range(200)]
    images = []
    for s in scenes:
        image = render(s, rng).filter(ImageFilter.GaussianBlur(1.0))
        array = np.asarray(image, np.float32) + rng.normal(0, 8, (64, 64, 3))
        array[rng.integers(0, 64), rng.integers(0, 64)] = 255  # an isolated bright speckle
        images.append(np.clip(array, 0, 255).astype(np.uint8))
    assert evaluate(images, scenes)["fully_correct"] >= 0.97


def test_detect_input_forms():
    s = scene(("triangle", "yellow", "large", "bottom left"), ("circle", "blue", "small", "top right"))
    image = render(s, np.random.default_rng(3))
    array = np.asarray(image)
    expected = sorted(s.objects, key=lambda o: POSITION_CELLS[o.position])
    for form in (
        image,
        array,
        array.astype(np.float32) / 255,
        np.moveaxis(array, -1, 0),
        image.resize((256, 256)),
    ):
        assert list(detect(form).objects) == expected
    assert detect(Image.new("RGB", (64, 64))).objects == ()


def test_score_exact_and_order_independent():
    s = scene(("circle", "red", "large", "top left"), ("square", "green", "small", "bottom"))
    flipped = Scene(tuple(reversed(s.objects)))
    result = score(s, flipped)
    assert result["fully_correct"] and result["count"]
    assert all(result[a] == 1.0 for a in ("shape", "color", "size", "position"))
    assert sorted(result["matches"]) == [(0, 1), (1, 0)]


def test_score_wrong_color():
    s = scene(("circle", "red", "large", "top left"), ("square", "green", "small", "bottom"))
    wrong = scene(("circle", "orange", "large", "top left"), ("square", "green", "small", "bottom"))
    result = score(s, wrong)
    assert not result["fully_correct"] and result["count"]
    assert result["color"] == 0.5 and result["shape"] == result["size"] == result["position"] == 1.0
    assert result["objects_correct"] == 1
    summary = evaluate([render(s, np.random.default_rng(0))] * 2, [s, wrong])
    assert summary["fully_correct"] == 0.5 and summary["color"] == 0.75 and summary["shape"] == 1.0


def test_score_counts_and_missing_objects():
    one = scene(("triangle", "blue", "small", "center"))
    two = scene(("triangle", "blue", "small", "center"), ("circle", "white", "large", "top"))
    extra = score(one, two)  # an extra object: attributes right but the count is wrong
    assert extra["shape"] == 1.0 and not extra["count"] and not extra["fully_correct"]
    missing = score(two, one)  # the unmatched expected object is wrong on everything
    assert missing["shape"] == missing["position"] == 0.5 and not missing["fully_correct"]
    nothing = score(one, Scene(()))
    assert nothing["color"] == 0.0 and not nothing["count"]
    # The assignment maximises correct attributes: the wrong-size detection still matches the right object.
    swapped = scene(("circle", "white", "small", "top"), ("triangle", "blue", "small", "center"))
    result = score(two, swapped)
    assert result["matches"] == [(0, 1), (1, 0)] and result["size"] == 0.5 and result["objects_correct"] == 1


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def test_make_dataset_files_and_determinism(tmp_path):
    a = make_dataset(tmp_path / "a", 12, seed=4, two_object_fraction=0.5)
    b = make_dataset(tmp_path / "b", 12, seed=4, two_object_fraction=0.5)
    c = make_dataset(tmp_path / "c", 12, seed=5, two_object_fraction=0.5)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(
        [f"{i:05d}.png" for i in range(12)] + [f"{i:05d}.txt" for i in range(12)] + ["metadata.jsonl"]
    )
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()
    records = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(12)]
    assert any(len(r["objects"]) == 2 for r in records)
    for r in records:
        truth = Scene.from_list(r["objects"])
        text = (a / r["file"].replace(".png", ".txt")).read_text().strip()
        assert text == r["caption"] and parse_caption(text) == truth
        assert r["canonical"] == canonical_caption(truth)
        with Image.open(a / r["file"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            assert score(truth, detect(image))["fully_correct"]
        for obj in r["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert _cell_of((x0 + x1) / 2, (y0 + y1) / 2, 64) == POSITION_CELLS[obj["position"]]


def test_make_dataset_heldout_split(tmp_path):
    out = make_dataset(tmp_path, 6, seed=0, split="heldout")
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert all(len(r["objects"]) == 1 for r in records)
    assert all((r["objects"][0]["color"], r["objects"][0]["shape"]) in HELD_OUT_PAIRS for r in records)


def test_make_dataset_reads_as_caption_folder(tmp_path):
    from vqdiffusion.data.folders import ImageCaptionFolder

    out = make_dataset(tmp_path, 4, seed=1)
    dataset = ImageCaptionFolder(out, image_size=64)
    assert len(dataset) == 4
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64)
    assert parse_caption(item["caption"]) is not None
