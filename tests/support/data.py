"""Tiny data folders for tests: captioned images and the token folder made from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vqdiffusion.training.tokenize import tokenize_dataset

from .weights import make_vqvae_dir

CAPTIONS = (
    "a red square",
    "a blue circle",
    "green stripes",
    "a yellow dot",
    "two red squares",
    "blue sky",
    "a black cat",
    "white noise",
)


def make_caption_folder(root: Path, size: int = 8, count: int = 8, seed: int = 0) -> Path:
    """``count`` random ``size`` x ``size`` PNGs with sidecar captions (``CAPTIONS``)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i}.png")
        (root / f"img_{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return root


def make_token_dir(root: Path, size: int = 8, count: int = 8) -> tuple[Path, Path]:
    """(token folder, VQ-VAE folder) of a random caption folder under ``root``."""
    vqvae_dir = make_vqvae_dir(root / "vqvae")
    data_dir = make_caption_folder(root / "data", size=size, count=count)
    tokens = tokenize_dataset(data_dir, vqvae_dir, root / "tokens", image_size=size, device="cpu", progress=False)
    return tokens, vqvae_dir


def make_blocks_dir(root: Path, palette: np.ndarray, count: int, seed: int = 0) -> Path:
    """``count`` 16x16 PNGs of four solid 8x8 blocks, each block's colour drawn from the rows of ``palette``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = np.zeros((16, 16, 3), np.uint8)
        for y in (0, 8):
            for x in (0, 8):
                image[y : y + 8, x : x + 8] = palette[rng.integers(len(palette))]
        Image.fromarray(image).save(root / f"{i}.png")
    return root
