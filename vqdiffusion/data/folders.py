"""Image datasets read from folders: captioned images, class folders (ImageNet style) and plain images.

Every dataset scans its folder once, at construction, and keeps the usable files in a sorted list.  Files
that cannot be used (an unreadable image, an image without a caption, a malformed caption line) are not
fatal: they are recorded in ``dataset.skipped`` as ``(path, reason)`` pairs and summarised in one logged
warning.  More than half of the candidate files being bad is taken as a wrong folder or format and raises
``ValueError``.  An image that passes the scan but fails to decode later (for example a truncated JPEG) is
reported the same way and replaced by the next good image, so a long training run never stops on it.

Items are dicts: ``"image"`` a float32 tensor ``[3, S, S]`` in ``[-1, 1]``, ``"path"`` the file as a string,
plus ``"caption"`` (:class:`ImageCaptionFolder`) or ``"label"`` (:class:`ClassFolder`).

Layouts of :class:`ImageCaptionFolder`, checked in this order:

* ``root/captions.jsonl``: one JSON object per line, ``{"file": "relative/path.png", "caption": "..."}``;
* ``root/captions.csv``: a header row ``file,caption`` then one row per image;
* otherwise a same-named text file beside each image: ``root/a/cat.png`` + ``root/a/cat.txt``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionFileError",
    "ClassFolder",
    "ImageCaptionFolder",
    "ImageFolder",
    "image_to_tensor",
    "load_image",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE_MODES = ("center_crop", "resize")
CAPTION_JSONL = "captions.jsonl"
CAPTION_CSV = "captions.csv"
# How many consecutive items __getitem__ tries when images fail to decode before giving up.
_MAX_DECODE_RETRIES = 16
# How many bad files an error message lists.
_LISTED_BAD = 5


# ---------------------------------------------------------------------------------------------------------
# Image transforms
# ---------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, image_size: int, resize: str = "center_crop") -> Image.Image:
    """Open an image file as an ``image_size`` x ``image_size`` RGB PIL image.

    Args:
        path: image file.
        image_size: output side S in pixels.
        resize: ``"center_crop"`` scales the shorter side to S (keeping the aspect ratio) then crops the
            centre square; ``"resize"`` scales both sides to S (distorting non-square images).

    Transparent images are composited on white.  Scaling is bicubic; large reductions are first done with
    a box filter (PIL's ``reducing_gap``), which avoids aliasing at a fraction of the cost.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    with Image.open(path) as opened:
        image = _to_rgb(ImageOps.exif_transpose(opened))  # a new, loaded image
    width, height = image.size
    if resize == "resize":
        size = (image_size, image_size)
    else:
        scale = image_size / min(width, height)
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if image.size != (image_size, image_size):
        left = (image.size[0] - image_size) // 2
        top = (image.size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image ``H x W`` -> float32 tensor ``[3, H, W]`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Deterministic coin for (seed, epoch, index), independent of worker processes and access order."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{epoch}:{index}".encode()))
    return bool(torch.rand((), generator=generator) < 0.5)


# ---------------------------------------------------------------------------------------------------------
# Scanning helpers
# ---------------------------------------------------------------------------------------------------------


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"data folder not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} is not a directory")
    return path


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _find_images(folder: Path, root: Path) -> list[Path]:
    """All image files under ``folder`` (recursively, hidden files and folders excluded), sorted."""
    found = [
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _is_hidden(p, root)
    ]
    return sorted(found)


def _verify_image(path: Path) -> str | None:
    """None if PIL recognises ``path`` as an intact image, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many exception types for bad files
        return f"unreadable image ({type(err).__name__}: {err})"
    return None


class CaptionFileError(ValueError):
    """A ``captions.jsonl`` / ``captions.csv`` that cannot be read as a whole (not UTF-8, not CSV, naming
    images outside its folder): refused even where captions are optional."""


@contextlib.contextmanager
def _utf8_errors(path: Path) -> Iterator[None]:
    """A file that is not UTF-8 becomes a ValueError naming it (the codec's own message names no file)."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise CaptionFileError(
            f"{path} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} at offset {err.start}); "
            "save it as UTF-8"
        ) from None


def _check_enough(root: Path, num_good: int, skipped: list[tuple[str, str]], what: str) -> None:
    total = num_good + len(skipped)
    if total == 0:
        raise ValueError(f"no {what} found in {root}; accepted image types are {', '.join(IMAGE_EXTENSIONS)}")
    if skipped:
        logger.warning(
            "%s: skipped %d of %d files (e.g. %s: %s); see the dataset's `skipped` list",
            root,
            len(skipped),
            total,
            skipped[0][0],
            skipped[0][1],
        )
    if len(skipped) * 2 > total or num_good == 0:
        listed = "; ".join(f"{path}: {reason}" for path, reason in skipped[:_LISTED_BAD])
        raise ValueError(
            f"{root}: {len(skipped)} of {total} files are unusable, which suggests a wrong folder or "
            f"layout (e.g. {listed})"
        )


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


class _FolderDataset(Dataset):
    """Shared machinery: a list of good image paths plus per-item extras, transforms and bad-file handling.

    Args:
        root: the data folder.
        image_size: output side S.
        resize: ``"center_crop"`` or ``"resize"`` (see :func:`load_image`).
        random_flip: mirror each image horizontally with probability 1/2.  The coin for item ``i`` is a
            pure function of ``(seed, epoch, i)`` (call :meth:`set_epoch` each epoch), so it is the same
            with any number of DataLoader workers and across a resumed run.
        seed: seed of the flip coins.
        verify: check every image with PIL at scan time (reads each file once); without it, bad images are
            only found, reported and replaced when an item is loaded.
    """

    _what = "images"

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        *,
        resize: str = "center_crop",
        random_flip: bool = False,
        seed: int = 0,
        verify: bool = True,
    ):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.root = _check_root(root)
        self.image_size = image_size
        self.resize = resize
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        candidates = self._scan()  # list of (path, extras); fills self.skipped
        self.paths: list[Path] = []
        self._extras: list[dict[str, Any]] = []
        for path, extras in candidates:
            reason = _verify_image(path) if verify else None
            if reason is not None:
                self.skipped.append((str(path), reason))
                continue
            self.paths.append(path)
            self._extras.append(extras)
        _check_enough(self.root, len(self.paths), self.skipped, self._what)

    def _scan(self) -> list[tuple[Path, dict[str, Any]]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Select the flip coins of ``epoch`` (only matters with ``random_flip``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """The transformed image of item ``index``: ``[3, S, S]`` float32 in ``[-1, 1]``."""
        image = image_to_tensor(load_image(self.paths[index], self.image_size, self.resize))
        if self.random_flip and _flip_decision(self.seed, self.epoch, index):
            image = image.flip(-1)
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        for attempt in range(min(n, _MAX_DECODE_RETRIES)):
            i = (index + attempt) % n
            try:
                image = self.load(i)
            except (OSError, ValueError, SyntaxError) as err:  # PIL decode errors
                reason = f"failed to decode ({type(err).__name__}: {err})"
                self.skipped.append((str(self.paths[i]), reason))
                logger.warning("%s: %s; using the next image instead", self.paths[i], reason)
                continue
            return {"image": image, "path": str(self.paths[i]), **self._extras[i]}
        raise ValueError(
            f"{self.root}: {min(n, _MAX_DECODE_RETRIES)} consecutive images from index {index} failed to "
            f"decode; see the dataset's `skipped` list"
        )


class ImageFolder(_FolderDataset):
    """Unconditional images: every image file under ``root``, recursively.  Items: ``image``, ``path``."""

    def _scan(self) -> list[tuple[Path, dict[str, Any]]]:
        return [(path, {}) for path in _find_images(self.root, self.root)]


class ClassFolder(_FolderDataset):
    """ImageNet-style class folders ``root/<class_name>/**/<image>``.  Items add ``label`` (int).

    Class indices follow the sorted folder names (``classes[label]`` is the name; ``class_to_idx`` the
    inverse), including folders that end up with no usable image, so indices do not depend on which files
    are bad.  Image files directly in ``root`` have no class and are skipped.
    """

    _what = "class folders with images"

    def _scan(self) -> list[tuple[Path, dict[str, Any]]]:
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ValueError(f"no class folders found in {self.root}; expected {self.root}/<class_name>/*.jpg")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        for path in sorted(self.root.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                self.skipped.append((str(path), "not inside a class folder"))
        out = []
        for name in self.classes:
            images = _find_images(self.root / name, self.root)
            if not images:
                logger.warning("%s: class folder %r holds no images", self.root, name)
            out.extend((path, {"label": self.class_to_idx[name]}) for path in images)
        return out


class ImageCaptionFolder(_FolderDataset):
    """Images with captions (see the module docstring for the three layouts).  Items add ``caption``.

    Captions are stripped of surrounding whitespace; an empty caption counts as missing.  With a
    ``captions.jsonl``/``captions.csv`` index, image files it does not name are skipped ("no caption"),
    and entries naming missing files are skipped ("file not found").
    """

    _what = "captioned images"

    @property
    def captions(self) -> list[str]:
        """The caption of each image of ``paths``, without loading any image."""
        return [extras["caption"] for extras in self._extras]

    def _scan(self) -> list[tuple[Path, dict[str, Any]]]:
        jsonl, csv_path = self.root / CAPTION_JSONL, self.root / CAPTION_CSV
        if jsonl.is_file():
            if csv_path.is_file():
                logger.warning(
                    "%s: both %s and %s exist; using %s", self.root, CAPTION_JSONL, CAPTION_CSV, CAPTION_JSONL
                )
            self.layout = "jsonl"
            captions = self._read_jsonl(jsonl)
        elif csv_path.is_file():
            self.layout = "csv"
            captions = self._read_csv(csv_path)
        else:
            self.layout = "txt"
            return self._scan_sidecars()
        out = []
        images = _find_images(self.root, self.root)
        indexed = set()
        for path, caption in captions.items():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                self.skipped.append((str(path), f"not an accepted image type {IMAGE_EXTENSIONS}"))
            elif not path.is_file():
                self.skipped.append((str(path), "file not found"))
            else:
                indexed.add(path)
                out.append((path, {"caption": caption}))
        for path in images:
            if path not in indexed:
                self.skipped.append((str(path), "no caption"))
        return sorted(out, key=lambda item: item[0])

    def _add_caption(self, captions: dict[Path, str], where: str, file: Any, caption: Any) -> None:
        if not isinstance(file, str) or not file.strip():
            self.skipped.append((where, f"missing or invalid 'file' ({file!r})"))
            return
        # normalised but not resolved, the same form as the paths of _find_images
        path = Path(os.path.normpath(self.root / file.strip()))
        root = Path(os.path.normpath(self.root))
        if root not in path.parents:
            raise CaptionFileError(
                f"{where}: {file!r} is outside the data folder {self.root}; a captions file may only name images "
                "inside its folder (move the image in or fix the path)"
            )
        if not isinstance(caption, str) or not caption.strip():
            self.skipped.append((str(path), f"missing or empty caption at {where}"))
            return
        if path in captions:
            self.skipped.append((where, f"duplicate entry for {file!r} (the first one is used)"))
            return
        captions[path] = caption.strip()

    def _read_jsonl(self, path: Path) -> dict[Path, str]:
        with _utf8_errors(path):
            return self._read_jsonl_lines(path)

    def _read_jsonl_lines(self, path: Path) -> dict[Path, str]:
        captions: dict[Path, str] = {}
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as err:
                    self.skipped.append((where, f"invalid JSON ({err})"))
                    continue
                if not isinstance(record, dict):
                    self.skipped.append((where, "expected a JSON object with 'file' and 'caption'"))
                    continue
                self._add_caption(captions, where, record.get("file"), record.get("caption"))
        return captions

    def _read_csv(self, path: Path) -> dict[Path, str]:
        captions: dict[Path, str] = {}
        with _utf8_errors(path), open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            try:
                fields = [name.strip() for name in reader.fieldnames or []]
                if "file" not in fields or "caption" not in fields:
                    raise CaptionFileError(
                        f"{path}: the header must name the columns 'file' and 'caption', got {fields}"
                    )
                reader.fieldnames = fields
                for row in reader:
                    self._add_caption(captions, f"{path}:{reader.line_num}", row.get("file"), row.get("caption"))
            except csv.Error as err:
                raise CaptionFileError(
                    f"{path}: not valid CSV after line {reader.line_num} ({err}; a caption may hold at most "
                    f"{csv.field_size_limit()} characters); fix or shorten the next row"
                ) from None
        return captions

    def _scan_sidecars(self) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for path in _find_images(self.root, self.root):
            text_path = path.with_suffix(".txt")
            if not text_path.is_file():
                self.skipped.append((str(path), f"no caption file {text_path.name}"))
                continue
            try:
                caption = text_path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                self.skipped.append((str(path), f"unreadable caption file ({err})"))
                continue
            if not caption:
                self.skipped.append((str(path), f"empty caption file {text_path.name}"))
                continue
            out.append((path, {"caption": caption}))
        return out
