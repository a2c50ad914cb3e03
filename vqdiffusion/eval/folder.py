"""Folders of images for the metrics and the contact sheet: listing, strict reading, and each image's caption.

Unlike the training data sets (:mod:`vqdiffusion.data.folders`, which skip bad files), an evaluation folder
must be intact: a number computed over "most of the images" is not the number asked for, so an unreadable
image or a size that differs from the folder's first image is an error that names the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.folders import IMAGE_EXTENSIONS, CaptionFileError, ImageCaptionFolder

__all__ = ["MANIFEST_FILE", "ImageBatches", "captions_of", "list_images", "read_manifest", "read_rgb"]

#: The manifest ``vqdiffusion sample-set`` writes beside its images (:mod:`vqdiffusion.eval.sample_set`).
MANIFEST_FILE = "manifest.json"


def list_images(folder: str | os.PathLike, *, what: str = "folder") -> list[Path]:
    """The image files under ``folder`` (recursively; hidden files and folders excluded), sorted by path."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{what} {root} not found")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} {root} is not a folder of images")
    found = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not found:
        raise ValueError(f"{what} {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def read_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (PIL ``convert("RGB")``); a file PIL cannot decode is a ValueError."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as err:  # PIL's guard against images too large to decode
        raise ValueError(
            f"cannot read image {path}: {err}; images of an evaluation folder are samples, not posters (resize it, "
            "or take it out of the folder)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's decode errors
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


class ImageBatches:
    """The images of a folder as uint8 tensors ``[B, 3, H, W]``, in sorted path order.

    Every image must have the size of the first one (``size``, (width, height)).  ``len()`` is the number
    of batches; the last one may be smaller.
    """

    def __init__(self, paths: list[Path], batch_size: int, *, what: str = "folder") -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.paths = paths
        self.batch_size = batch_size
        self.what = what
        self.size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.paths), self.batch_size):
            arrays = []
            for path in self.paths[start : start + self.batch_size]:
                image = read_rgb(path)
                if self.size is None:
                    self.size = image.size
                elif image.size != self.size:
                    w, h = self.size
                    raise ValueError(
                        f"{path} is {image.size[0]}x{image.size[1]} but the {self.what}'s first image is {w}x{h}; "
                        "every image of a folder must have one size (resize or crop them first)"
                    )
                arrays.append(np.asarray(image, dtype=np.uint8))
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sample-set`` manifest of ``folder`` (``manifest.json``), or None when there is none."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), list):
        raise ValueError(f"{path} is not a sample-set manifest (no 'images' list)")
    return manifest


def captions_of(folder: str | os.PathLike, paths: list[Path], *, strict: bool = True) -> list[str | None]:
    """The caption of each image in ``paths`` (all under ``folder``).

    From the ``sample-set`` manifest when the folder has one (the image's ``prompt``; ``"class N"`` for a
    class label), else from the captioned-folder layouts of :class:`~vqdiffusion.data.folders.ImageCaptionFolder`
    (``captions.jsonl``, ``captions.csv`` or a ``.txt`` file beside each image).  With ``strict`` an image
    without a caption is an error; otherwise its caption is None.
    """
    root = Path(folder)
    manifest = read_manifest(root)
    found: dict[Path, str] = {}
    if manifest is not None:
        for number, entry in enumerate(manifest["images"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
                shown = entry.get("file") if isinstance(entry, dict) else entry
                raise ValueError(
                    f"{root / MANIFEST_FILE}: images[{number}] has no file name (got {shown!r}); each entry needs "
                    '"file": "NAME.png" (rewrite the folder with sample-set)'
                )
            if isinstance(entry.get("prompt"), str):
                found[Path(os.path.normpath(root / entry["file"]))] = entry["prompt"]
            elif isinstance(entry.get("label"), int):
                found[Path(os.path.normpath(root / entry["file"]))] = f"class {entry['label']}"
    else:
        # The training reader logs the files it skips; here a missing caption is reported below (or allowed).
        folder_logger = logging.getLogger(ImageCaptionFolder.__module__)
        level = folder_logger.level
        folder_logger.setLevel(logging.ERROR)
        try:
            dataset = ImageCaptionFolder(root, image_size=1, verify=False)
            found = dict(zip(dataset.paths, dataset.captions, strict=True))
        except CaptionFileError:
            raise  # a damaged captions file is an error even where captions are optional
        except ValueError:
            if strict:
                raise
        finally:
            folder_logger.setLevel(level)
    out = [found.get(Path(os.path.normpath(p))) for p in paths]
    if strict:
        missing = [p for p, caption in zip(paths, out, strict=True) if caption is None]
        if missing:
            source = MANIFEST_FILE if manifest is not None else "captions.jsonl, captions.csv or a .txt beside it"
            raise ValueError(f"{missing[0]} has no caption ({len(missing)} of {len(paths)} images; looked in {source})")
    return out
