"""A contact sheet: the images of a folder as one captioned grid PNG (``vqdiffusion sheet``).

Each cell is the image scaled to ``thumb`` pixels (its longer side, aspect kept; bicubic when reduced,
nearest when enlarged) with its caption underneath, wrapped to the cell width and cut after
``caption_lines`` lines.  The caption is the image's prompt or class from the ``sample-set`` manifest,
else from a captions file, else its file name (see :func:`~vqdiffusion.eval.folder.captions_of`).
Images are taken in sorted path order.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..devices import available_memory, format_bytes
from ..pipeline import MAX_GRID_PIXELS
from .folder import captions_of, list_images, read_rgb

__all__ = ["contact_sheet"]

_PAD = 4
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines; cut text ends with "..."."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if not line or font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    for n, line in enumerate(lines):
        if cut and n == len(lines) - 1 or font.getlength(line) > width:
            while line and font.getlength(line + "...") > width:
                line = line[:-1]
            lines[n] = line + "..."
    return lines


def _check_size(width: int, height: int) -> None:
    """ValueError for a sheet larger than :data:`MAX_GRID_PIXELS` or than the memory available."""
    pixels = width * height
    free = available_memory("cpu")
    if pixels > MAX_GRID_PIXELS or (free is not None and 3 * pixels > 0.5 * free):
        raise ValueError(
            f"the sheet would be {width} x {height} pixels ({format_bytes(3 * pixels)}); the limit is "
            f"{MAX_GRID_PIXELS} pixels within the free memory: use a smaller --thumb, --columns or --max-images"
        )


def contact_sheet(
    folder: str | os.PathLike,
    *,
    columns: int | None = None,
    thumb: int = 128,
    max_images: int = 64,
    captions: bool = True,
    caption_lines: int = 3,
    font_size: int = 11,
) -> Image.Image:
    """The first ``max_images`` images of ``folder`` as a grid (``columns`` defaults to ceil(sqrt(n)))."""
    if thumb < 8 or max_images < 1 or (columns is not None and columns < 1) or caption_lines < 1:
        raise ValueError(
            f"need thumb >= 8, max_images >= 1, columns >= 1 and caption_lines >= 1, got {thumb}, {max_images}, "
            f"{columns}, {caption_lines}"
        )
    paths = list_images(folder)[:max_images]
    columns = min(columns or math.ceil(math.sqrt(len(paths))), len(paths))
    rows = math.ceil(len(paths) / columns)
    font = _font(font_size)
    line_height = font_size + 3
    text_height = caption_lines * line_height + _PAD if captions else 0
    cell_w, cell_h = thumb + 2 * _PAD, thumb + 2 * _PAD + text_height
    width, height = columns * cell_w, rows * cell_h
    _check_size(width, height)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    labels = captions_of(folder, paths, strict=False) if captions else [None] * len(paths)
    for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
        image = read_rgb(path)
        scale = thumb / max(image.size)
        if scale != 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            # enlarged small samples stay crisp (nearest); large images are reduced smoothly (bicubic)
            image = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
        x0, y0 = (i % columns) * cell_w + _PAD, (i // columns) * cell_h + _PAD
        sheet.paste(image, (x0 + (thumb - image.width) // 2, y0 + (thumb - image.height) // 2))
        if captions:
            text = label if label is not None else Path(path).name
            for n, line in enumerate(_wrap(text, font, thumb, caption_lines)):
                draw.text((x0, y0 + thumb + _PAD + n * line_height), line, fill=_TEXT, font=font)
    return sheet
