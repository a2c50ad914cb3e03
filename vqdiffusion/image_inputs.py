"""Images and masks given to the editing methods, as checked tensors.

An image is a PIL image, a numpy array ([H, W, 3] uint8 or float in [0, 1]) or a tensor ([3, H, W] or
[B, 3, H, W] float in [0, 1]), or a list of them; a mask is a PIL image (white = regenerate), a numpy array
or a tensor ([H, W] or [B, H, W]: bool, or numbers in [0, 1] thresholded at 0.5), or a list of them.  Sizes
must equal the model's: the messages say which size was given and how to fix it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

ImageInput = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | list of them
MaskInput = Any


def image_batch(image: ImageInput, size: tuple[int, int] | None, what: str = "image") -> torch.Tensor:
    """``image`` as a [B, 3, H, W] float32 tensor in [0, 1]; ``size`` = (W, H) the model's image size (None:
    any size, the same for all)."""
    parts = image if isinstance(image, list | tuple) else [image]
    if not parts:
        raise ValueError(f"{what}: got an empty list; give one image or one per prompt")
    tensors = [_one_image(part, what) for part in parts]
    if size is None and len({t.shape[-2:] for t in tensors}) > 1:
        raise ValueError(f"{what}: the images have different sizes; give images of one size")
    out = torch.cat(tensors)
    if size is not None:
        _check_size(out.shape[-1], out.shape[-2], size, what)
    return out


def mask_batch(mask: MaskInput, size: tuple[int, int], what: str = "mask") -> torch.Tensor:
    """``mask`` as a [B, H, W] bool tensor (True = regenerate).  A mask with values other than 0 and 1
    (after scaling 8-bit masks to [0, 1]) is thresholded at 0.5, with a warning."""
    parts = mask if isinstance(mask, list | tuple) else [mask]
    if not parts:
        raise ValueError(f"{what}: got an empty list; give one mask or one per prompt")
    values = torch.cat([_one_mask(part, what) for part in parts])
    _check_size(values.shape[-1], values.shape[-2], size, what)
    if values.dtype == torch.bool:
        return values
    if not bool(((values == 0) | (values == 1)).all()):
        logger.warning("%s is not binary (values between 0 and 1): thresholded at 0.5 (white = regenerate)", what)
    return values >= 0.5


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """A [1, H, W] bool mask, True inside ``box`` = (x0, y0, x1, y1) pixels (x1, y1 exclusive)."""
    width, height = size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"box {tuple(box)} is not inside the {width}x{height} image: need 0 <= x0 < x1 <= {width} and "
            f"0 <= y0 < y1 <= {height}"
        )
    mask = torch.zeros((1, height, width), dtype=torch.bool)
    mask[:, y0:y1, x0:x1] = True
    return mask


def _check_size(width: int, height: int, size: tuple[int, int], what: str) -> None:
    if (width, height) != tuple(size):
        raise ValueError(
            f"{what} is {width}x{height} but the model makes {size[0]}x{size[1]} images; resize it to "
            f"{size[0]}x{size[1]} (PIL: image.resize(({size[0]}, {size[1]})); command line: --resize)"
        )


def _one_image(image: ImageInput, what: str) -> torch.Tensor:
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what}: a numpy image must be [H, W, 3], got shape {image.shape}")
        array = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        return _in_unit_range(torch.from_numpy(array).permute(2, 0, 1)[None].contiguous(), what)
    if isinstance(image, torch.Tensor):
        _check_has_values(image, what)
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"{what}: a tensor image must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{what}: a tensor image must be floating point in [0, 1], got dtype {t.dtype}")
        return _in_unit_range(t.detach().float().cpu(), what)
    raise ValueError(f"{what} must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")


def _check_has_values(t: torch.Tensor, what: str) -> None:
    """A tensor whose values can be read: not on the meta device (a shape without data), not sparse."""
    if t.device.type == "meta":
        raise ValueError(
            f"{what} is a tensor on the meta device (a shape without values); give a tensor that holds the values, "
            "e.g. on cpu"
        )
    if t.layout != torch.strided:
        raise ValueError(f"{what} is a {t.layout} tensor; give a dense one (tensor.to_dense())")


def _in_unit_range(t: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError(f"{what} must hold values in [0, 1] (uint8 arrays: 0 to 255)")
    return t


def _one_mask(mask: MaskInput, what: str) -> torch.Tensor:
    if isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(array)[None]
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
        if mask.dtype == torch.uint8:
            mask = mask.float() / 255.0
    if isinstance(mask, torch.Tensor):
        _check_has_values(mask, what)
        t = mask[None] if mask.ndim == 2 else mask
        if t.ndim != 3:
            raise ValueError(f"{what} must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
        if t.dtype == torch.bool:
            return t.cpu()
        t = t.detach().float().cpu()
        return _in_unit_range(t, what)
    raise ValueError(f"{what} must be a PIL image, a numpy array or a tensor, got {type(mask).__name__}")
