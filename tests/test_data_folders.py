"""Folder datasets: the three caption layouts, class folders, plain images, bad files, transforms, flips."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiffusion.data.folders import ClassFolder, ImageCaptionFolder, ImageFolder, image_to_tensor, load_image

S = 8


def write_image(path, color=(255, 0, 0), size=(12, 10), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def write_corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return path


def asymmetric_image(path, size=16):
    """Left half black, right half white: a flip swaps them."""
    array = np.zeros((size, size, 3), np.uint8)
    array[:, size // 2 :] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Caption layouts
# ---------------------------------------------------------------------------------------------------------


def test_txt_sidecars_with_bad_files_skipped_and_reported(tmp_path, caplog):
    write_image(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "a.txt").write_text("a red square\n")
    write_image(tmp_path / "sub" / "b.jpg", (0, 255, 0), fmt="JPEG")
    (tmp_path / "sub" / "b.txt").write_text("green")
    write_image(tmp_path / "c.webp", (0, 0, 255))
    (tmp_path / "c.txt").write_text("blue")
    write_image(tmp_path / "d.bmp", (9, 9, 9))
    (tmp_path / "d.txt").write_text("dark")
    write_image(tmp_path / "no_caption.png")
    write_corrupt(tmp_path / "broken.png")
    (tmp_path / "broken.txt").write_text("broken")
    (tmp_path / "notes.md").write_text("ignored: not an image")
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionFolder(tmp_path, S)
    assert ds.layout == "txt"
    assert len(ds) == 4
    assert sorted(ds[i]["caption"] for i in range(len(ds))) == ["a red square", "blue", "dark", "green"]
    skipped = {p.split("/")[-1]: reason for p, reason in ds.skipped}
    assert set(skipped) == {"no_caption.png", "broken.png"}
    assert "no caption" in skipped["no_caption.png"] and "unreadable" in skipped["broken.png"]
    assert any("skipped 2 of 6" in r.getMessage() for r in caplog.records)
    item = ds[0]
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert item["path"].endswith("a.png")
    assert torch.allclose(item["image"][0], torch.ones(S, S)) and torch.allclose(item["image"][1], -torch.ones(S, S))


def test_jsonl_layout(tmp_path):
    for name in ("x.png", "y.png", "unlisted.png"):
        write_image(tmp_path / "img" / name)
    lines = [
        json.dumps({"file": "img/x.png", "caption": "first"}),
        "",
        "{not json",
        json.dumps({"file": "img/y.png", "caption": "  second  "}),
        json.dumps({"file": "img/missing.png", "caption": "gone"}),
        json.dumps({"file": "img/x.png", "caption": "duplicate"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    # 2 good; bad: invalid JSON, missing file, duplicate entry and the unlisted image -> 4 of 6
    with pytest.raises(ValueError, match="4 of 6 files are unusable"):
        ImageCaptionFolder(tmp_path, S)
    for i in range(3):
        write_image(tmp_path / "img" / f"more{i}.png")
    (tmp_path / "captions.jsonl").write_text(
        "\n".join(lines + [json.dumps({"file": f"img/more{i}.png", "caption": f"m{i}"}) for i in range(3)] + [""])
    )
    ds = ImageCaptionFolder(tmp_path, S)
    assert ds.layout == "jsonl"
    assert [ds[i]["caption"] for i in range(len(ds))] == ["m0", "m1", "m2", "first", "second"]
    reasons = " | ".join(reason for _, reason in ds.skipped)
    for expected in ("invalid JSON", "file not found", "duplicate", "no caption"):
        assert expected in reasons
    assert len(ds.skipped) == 4


def test_csv_layout_and_bad_header(tmp_path):
    write_image(tmp_path / "p.png")
    write_image(tmp_path / "q.jpeg", fmt="JPEG")
    (tmp_path / "captions.csv").write_text('file,caption\np.png,"a cat, sitting"\nq.jpeg,dog\n')
    ds = ImageCaptionFolder(tmp_path, S)
    assert ds.layout == "csv"
    assert [ds[i]["caption"] for i in range(2)] == ["a cat, sitting", "dog"]
    assert ds.skipped == []
    (tmp_path / "captions.csv").write_text("path,text\np.png,cat\n")
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        ImageCaptionFolder(tmp_path, S)


# ---------------------------------------------------------------------------------------------------------
# Class folders and plain images
# ---------------------------------------------------------------------------------------------------------


def test_class_folders(tmp_path):
    write_image(tmp_path / "zebra" / "1.png", (0, 0, 0))
    write_image(tmp_path / "zebra" / "2.png", (0, 0, 0))
    write_image(tmp_path / "apple" / "1.jpg", (255, 0, 0), fmt="JPEG")
    write_image(tmp_path / "apple" / "nested" / "2.png", (255, 0, 0))
    (tmp_path / "empty_class").mkdir()
    write_image(tmp_path / "stray.png")
    ds = ClassFolder(tmp_path, S)
    assert ds.classes == ["apple", "empty_class", "zebra"]
    assert ds.class_to_idx == {"apple": 0, "empty_class": 1, "zebra": 2}
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 0, 2, 2]
    assert ds[3]["path"].endswith("zebra/2.png")
    assert [reason for _, reason in ds.skipped] == ["not inside a class folder"]
    with pytest.raises(ValueError, match="no class folders"):
        ClassFolder(tmp_path / "zebra", S)


def test_image_folder_modes_and_recursion(tmp_path):
    write_image(tmp_path / "rgba.png", (255, 0, 0), mode="RGBA")
    write_image(tmp_path / "gray.png", (128, 128, 128), mode="L")
    write_image(tmp_path / "pal.png", (0, 0, 255), mode="P")
    write_image(tmp_path / "deep" / "er" / "x.PNG", (0, 255, 0))
    write_image(tmp_path / ".hidden" / "y.png")
    ds = ImageFolder(tmp_path, S)
    assert len(ds) == 4
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert image.shape == (3, S, S) and image.min() >= -1 and image.max() <= 1
        assert set(ds[i]) == {"image", "path"}


def test_empty_missing_and_mostly_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolder(tmp_path / "nope", S)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        ImageFolder(tmp_path / "empty", S)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolder(tmp_path / "file.txt", S)
    bad = tmp_path / "bad"
    write_image(bad / "ok.png")
    for i in range(2):
        write_corrupt(bad / f"c{i}.png")
    with pytest.raises(ValueError, match="2 of 3 files are unusable.*c0.png"):
        ImageFolder(bad, S)
    write_image(bad / "ok2.png")
    assert len(ImageFolder(bad, S)) == 2  # exactly half bad is tolerated


def test_decode_failure_at_load_time_uses_next_image(tmp_path, caplog):
    write_corrupt(tmp_path / "a_bad.png")
    write_image(tmp_path / "b.png", (255, 255, 255))
    ds = ImageFolder(tmp_path, S, verify=False)
    assert len(ds) == 2
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["path"].endswith("b.png")
    assert ds.skipped and ds.skipped[0][0].endswith("a_bad.png")
    assert any("using the next image" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------


def test_center_crop_and_resize(tmp_path):
    array = np.zeros((16, 32, 3), np.uint8)
    array[:, :8] = (255, 0, 0)
    array[:, 8:24] = (0, 255, 0)
    array[:, 24:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    cropped = image_to_tensor(load_image(path, 16, "center_crop"))
    assert cropped.shape == (3, 16, 16)
    assert torch.equal(cropped[1], torch.ones(16, 16)) and torch.equal(cropped[0], -torch.ones(16, 16))
    squashed = image_to_tensor(load_image(path, 8, "resize"))
    assert squashed.shape == (3, 8, 8)
    assert squashed[0, :, 0].min() > 0.5 and squashed[2, :, -1].min() > 0.5  # red left, blue right kept
    big = image_to_tensor(load_image(path, 64))  # upscaling
    assert big.shape == (3, 64, 64) and big.min() >= -1 and big.max() <= 1
    with pytest.raises(ValueError, match="resize must be one of"):
        ImageFolder(tmp_path, 8, resize="stretch")
    with pytest.raises(ValueError, match="image_size"):
        ImageFolder(tmp_path, 0)


def test_random_flip_deterministic_by_seed_and_epoch(tmp_path):
    for i in range(12):
        asymmetric_image(tmp_path / f"{i:02d}.png")
    plain = ImageFolder(tmp_path, 16)
    reference = plain[0]["image"]

    def flips(ds):
        out = []
        for i in range(len(ds)):
            image = ds[i]["image"]
            assert torch.equal(image, reference) or torch.equal(image, reference.flip(-1))
            out.append(torch.equal(image, reference.flip(-1)))
        return out

    a = ImageFolder(tmp_path, 16, random_flip=True, seed=3)
    b = ImageFolder(tmp_path, 16, random_flip=True, seed=3)
    first = flips(a)
    assert first == flips(b) == flips(a)
    assert 0 < sum(first) < len(first)
    a.set_epoch(1)
    assert flips(a) != first
    c = ImageFolder(tmp_path, 16, random_flip=True, seed=4)
    assert flips(c) != first
    assert not any(flips(plain))
