"""Encode an image data set into VQ tokens once, so diffusion training never runs the VQ encoder per step.

``tokenize_dataset(data_dir, vqvae_dir, out_dir)`` reads a folder with the datasets of
:mod:`vqdiffusion.data.folders`, encodes every usable image with the VQ-VAE and writes a token folder with
:func:`vqdiffusion.data.tokens.write_token_folder` (read back by :class:`vqdiffusion.data.tokens.TokenDataset`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.folders import RESIZE_MODES, ClassFolder, ImageCaptionFolder, ImageFolder
from ..data.tokens import META_FILE, TOKEN_KINDS, token_dtype, write_token_folder
from ..devices import resolve_device

__all__ = ["tokenize_dataset"]

logger = logging.getLogger(__name__)


class _Items(Dataset):
    """``(index, image or None, reason)`` for every item of a folder dataset: a file that fails to decode is
    reported instead of being replaced by its neighbour (the folder datasets' training behaviour)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.dataset.load(index), None
        except (OSError, ValueError, SyntaxError) as err:  # PIL decode errors
            return index, None, f"failed to decode ({type(err).__name__}: {err})"


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(indices of the images that decoded, those images stacked [n, 3, S, S] or None, (index, reason) of the
    rest).  Stacking in the loader process sends one tensor per batch to the main process instead of one per
    image, which made the per-tensor hand-over, not decoding, the cost of a tokenize run with workers."""
    good = [(i, image) for i, image, _ in items if image is not None]
    images = torch.stack([image for _, image in good]) if good else None
    return [i for i, _ in good], images, [(i, reason) for i, image, reason in items if image is None]


def _open_dataset(kind: str, data_dir: str | os.PathLike, image_size: int, resize: str):
    if kind == "captions":
        return ImageCaptionFolder(data_dir, image_size, resize=resize)
    if kind == "classes":
        return ClassFolder(data_dir, image_size, resize=resize)
    return ImageFolder(data_dir, image_size, resize=resize)


def tokenize_dataset(
    data_dir: str | os.PathLike,
    vqvae_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: str = "captions",
    image_size: int | None = None,
    resize: str = "center_crop",
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every usable image of ``data_dir`` with the VQ-VAE of ``vqvae_dir``; returns ``out_dir``.

    Args:
        data_dir: an image folder (``kind="captions"``: :class:`ImageCaptionFolder` layouts; ``"classes"``:
            class sub-folders; ``"unconditional"``: any images).
        vqvae_dir: an exported tokenizer (``config.json`` + ``model.safetensors``, or a folder holding such
            a ``vqvae/``), e.g. the output of ``vqdiffusion train-vqvae``.
        out_dir: where the token files go (see the module docstring).
        image_size: side S the images are brought to (default: the VQ-VAE's ``sample_size``); must be a
            multiple of its downsampling factor f, giving an ``S/f x S/f`` token grid.
        resize: ``"center_crop"`` or ``"resize"``.
        batch_size: images per encoder call.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        num_workers: DataLoader processes decoding images.
        overwrite: replace an existing token folder (otherwise refused).
        progress: show a progress bar.
    """
    from ..models.vqvae import load_vqvae

    if kind not in TOKEN_KINDS:
        raise ValueError(f"kind must be one of {list(TOKEN_KINDS)}, got {kind!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    out = Path(out_dir)
    if (out / META_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a token data set; choose another output folder or pass --overwrite")
    torch_device = resolve_device(device)
    vqvae = load_vqvae(vqvae_dir).to(torch_device).eval()
    config = vqvae.config
    size = config.sample_size if image_size is None else image_size
    f = config.downsample_factor
    if isinstance(size, bool) or not isinstance(size, int) or size < f or size % f:
        raise ValueError(
            f"image_size must be a positive multiple of the VQ-VAE's downsampling factor {f}, got {size!r}"
        )
    dataset = _open_dataset(kind, data_dir, size, resize)
    tokens, kept, skipped = _encode_all(dataset, vqvae, torch_device, batch_size, num_workers, progress)
    if not kept:
        raise ValueError(f"{data_dir}: no image could be decoded (see the warnings above)")
    root = Path(dataset.root)
    records = [_record(dataset, i, kind) for i in kept]
    write_token_folder(
        out,
        tokens,
        records,
        kind=kind,
        num_classes=config.num_embeddings,
        image_size=size,
        resize=resize,
        data_dir=root,
        vqvae_dir=vqvae_dir,
        vqvae_config=config.to_dict(),
        class_names=dataset.classes if kind == "classes" else None,
        skipped=skipped,
    )
    if skipped:
        logger.warning("tokenized %d images; skipped %d files (listed in %s)", len(records), len(skipped), META_FILE)
    return out


def _encode_all(
    dataset: Any, vqvae: Any, device: torch.device, batch_size: int, num_workers: int, progress: bool
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Tokens [n, h, w] of every image that decodes, the dataset indices kept, and the files skipped (the
    folder's own plus undecodable images, each with its reason)."""
    skipped = list(dataset.skipped)
    loader = DataLoader(
        _Items(dataset),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    dtype = token_dtype(vqvae.config.num_embeddings)
    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    with tqdm(total=len(dataset), desc="tokenize", unit="img", disable=not progress) as bar:
        for indices, images, failures in loader:
            for i, reason in failures:
                skipped.append((str(dataset.paths[i]), reason))
                logger.warning("%s: %s; skipped", dataset.paths[i], reason)
            if images is not None:
                with torch.inference_mode():
                    chunks.append(vqvae.encode(images.to(device, non_blocking=True)).to("cpu", dtype))
                kept.extend(indices)
            bar.update(len(indices) + len(failures))
    return (torch.cat(chunks) if chunks else torch.empty(0)), kept, skipped


def _record(dataset: Any, index: int, kind: str) -> dict[str, Any]:
    """The token folder's record of one image: its file relative to the data folder, its caption or label."""
    record: dict[str, Any] = {"file": dataset.paths[index].relative_to(Path(dataset.root)).as_posix()}
    extras = dataset._extras[index]
    if kind == "captions":
        record["caption"] = extras["caption"]
    elif kind == "classes":
        record["label"] = int(extras["label"])
    return record
