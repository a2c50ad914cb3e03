"""Images out: the pipeline's output types and image grids (the CLI's and the evaluation's contact sheets)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

OutputType = Literal["pil", "np", "pt", "tokens"]


def to_output_type(images: torch.Tensor, output_type: OutputType) -> Any:
    """[B, 3, H, W] float in [0, 1] -> the requested type."""
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def join_outputs(parts: list[Any], output_type: OutputType) -> Any:
    """The per-batch outputs of one call as one output of ``output_type``."""
    if len(parts) == 1:
        return parts[0]
    if output_type == "pt":
        return torch.cat(parts)
    if output_type == "np":
        return np.concatenate(parts)
    return [image for part in parts for image in part]


# The largest grid written (PIL's decompression-bomb limit: image viewers and PIL itself open nothing larger).
MAX_GRID_PIXELS = 178_956_970


def grid_shape(count: int, columns: int | None = None) -> tuple[int, int]:
    """(columns, rows) of a grid of ``count`` images: ``columns`` or a square."""
    columns = columns or int(np.ceil(np.sqrt(count)))
    return columns, int(np.ceil(count / columns))


def check_grid_size(count: int, width: int, height: int, columns: int | None = None) -> None:
    """ValueError when a grid of ``count`` images of ``width`` x ``height`` exceeds :data:`MAX_GRID_PIXELS`."""
    cols, rows = grid_shape(count, columns)
    if cols * width * rows * height > MAX_GRID_PIXELS:
        raise ValueError(
            f"a grid of {count} images of {width} x {height} would be {cols * width} x {rows * height} pixels, more "
            f"than the {MAX_GRID_PIXELS} an image may have; write the images to a folder or make fewer"
        )


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equally sized images into a grid, row-major (at most :data:`MAX_GRID_PIXELS` pixels)."""
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    check_grid_size(len(images), w, h, columns)
    columns, rows = grid_shape(len(images), columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
