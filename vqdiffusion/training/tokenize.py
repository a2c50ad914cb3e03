"""Encode an image data set into VQ tokens once, so diffusion training never runs the VQ encoder per step.

``tokenize_dataset(data_dir, vqvae_dir, out_dir)`` reads a folder with the datasets of
:mod:`vqdiffusion.data.folders` and writes ``out_dir`` with three files:

* ``tokens.safetensors``: ``tokens`` ``[N, h, w]`` (int16 when the codebook has K <= 32767 entries, else
  int32), values in ``[0, K)``; plus ``labels`` ``[N]`` int64 for class folders.
* ``captions.jsonl``: one JSON object per item, index-aligned with ``tokens``: ``{"file": relative path}``
  plus ``"caption"`` (``kind="captions"``) or ``"label"`` (``kind="classes"``).
* ``meta.json``: ``format``/``format_version``, ``kind``, ``count``, ``num_classes`` (K), ``token_shape``
  ``[h, w]``, ``dtype``, ``image_size``, ``resize``, ``data_dir`` and ``vqvae_dir`` (absolute paths),
  ``vqvae_config``, ``class_names`` (class folders, else null) and ``skipped`` (``[path, reason]`` pairs of
  files that could not be used).  It is written last: a folder without it is an incomplete run.

:class:`TokenDataset` reads such a folder back and checks it (shapes, dtype, value range, item counts),
raising errors that name the file at fault.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import atomic_write_text
from ..data.folders import RESIZE_MODES, ClassFolder, ImageCaptionFolder, ImageFolder
from ..io import load_weights, save_safetensors
from .common import resolve_device

__all__ = [
    "TOKEN_KINDS",
    "TokenDataset",
    "add_tokenize_parser",
    "run_tokenize",
    "tokenize_dataset",
]

logger = logging.getLogger(__name__)

TOKEN_KINDS = ("captions", "classes", "unconditional")
TOKENS_FILE = "tokens.safetensors"
CAPTIONS_FILE = "captions.jsonl"
META_FILE = "meta.json"
FORMAT_NAME = "vqdiffusion.tokens"
FORMAT_VERSION = 1
_INT16_MAX_CLASSES = 32767


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


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> list:
    return items


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
    from .vqvae import load_vqvae  # the tokenizer trainer imports much more than the loader needs

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
    skipped = list(dataset.skipped)
    loader = DataLoader(_Items(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    k = config.num_embeddings
    dtype = torch.int16 if k <= _INT16_MAX_CLASSES else torch.int32
    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    with tqdm(total=len(dataset), desc="tokenize", unit="img", disable=not progress) as bar:
        for items in loader:
            good = [(i, image) for i, image, _ in items if image is not None]
            for i, _, reason in items:
                if reason is not None:
                    skipped.append((str(dataset.paths[i]), reason))
                    logger.warning("%s: %s; skipped", dataset.paths[i], reason)
            if good:
                images = torch.stack([image for _, image in good]).to(torch_device)
                with torch.inference_mode():
                    chunks.append(vqvae.encode(images).to("cpu", dtype))
                kept.extend(i for i, _ in good)
            bar.update(len(items))
    if not kept:
        raise ValueError(f"{data_dir}: no image could be decoded (see the warnings above)")
    tokens = torch.cat(chunks)
    root = Path(dataset.root)
    records: list[dict[str, Any]] = []
    for i in kept:
        record: dict[str, Any] = {"file": dataset.paths[i].relative_to(root).as_posix()}
        extras = dataset._extras[i]
        if kind == "captions":
            record["caption"] = extras["caption"]
        elif kind == "classes":
            record["label"] = int(extras["label"])
        records.append(record)
    tensors = {"tokens": tokens}
    if kind == "classes":
        tensors["labels"] = torch.tensor([r["label"] for r in records], dtype=torch.long)

    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # an overwritten folder is incomplete until the new meta lands
    save_safetensors(tensors, out / TOKENS_FILE)
    atomic_write_text(out / CAPTIONS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "count": len(records),
        "num_classes": k,
        "token_shape": [size // f, size // f],
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": size,
        "resize": resize,
        "data_dir": str(root.resolve()),
        "vqvae_dir": str(Path(vqvae_dir).resolve()),
        "vqvae_config": config.to_dict(),
        "class_names": list(dataset.classes) if kind == "classes" else None,
        "skipped": [[str(path), str(reason)] for path, reason in skipped],
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    if skipped:
        logger.warning("tokenized %d images; skipped %d files (listed in %s)", len(records), len(skipped), META_FILE)
    return out


class TokenDataset(Dataset):
    """A token folder written by :func:`tokenize_dataset`, checked on load.

    Attributes:
        tokens: ``[N, h, w]`` int16/int32 tensor (kept in its compact dtype; items are int64).
        labels: ``[N]`` int64 (``kind == "classes"``) or None.
        captions: list of N strings (``kind == "captions"``) or None.
        files: list of N source files, relative to ``meta["data_dir"]``.
        meta: the ``meta.json`` dict.

    Items are dicts ``{"tokens": [h * w] int64 (row-major), "index": int}`` plus ``"caption"`` or ``"label"``.
    Raises FileNotFoundError for a missing folder or file and ValueError for a corrupt or inconsistent one.
    """

    def __init__(self, directory: str | os.PathLike):
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"token folder not found: {root}")
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{root} is not a token folder (no {META_FILE}); create one with `vqdiffusion tokenize DATA_DIR "
                f"--vqvae VQVAE_DIR --out {root}`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_path} is not valid JSON ({err}); re-run vqdiffusion tokenize") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{meta_path}: not a {FORMAT_NAME} file (format {_get(meta, 'format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r} is not supported (this version "
                f"reads {FORMAT_VERSION}); re-run vqdiffusion tokenize"
            )
        missing = [key for key in ("kind", "count", "num_classes", "token_shape") if key not in meta]
        if missing:
            raise ValueError(f"{meta_path} lacks {missing}; re-run vqdiffusion tokenize")
        kind, count, k, shape = meta["kind"], meta["count"], meta["num_classes"], meta["token_shape"]
        if kind not in TOKEN_KINDS:
            raise ValueError(f"{meta_path}: kind must be one of {list(TOKEN_KINDS)}, got {kind!r}")
        if not _positive_int(count) or not _positive_int(k) or k < 2:
            raise ValueError(f"{meta_path}: count and num_classes must be positive integers, got {count!r}, {k!r}")
        if not isinstance(shape, list) or len(shape) != 2 or not all(_positive_int(s) for s in shape):
            raise ValueError(f"{meta_path}: token_shape must be [h, w] with positive integers, got {shape!r}")

        tensors = load_weights(root / TOKENS_FILE)
        expected_keys = {"tokens", "labels"} if kind == "classes" else {"tokens"}
        if set(tensors) != expected_keys:
            raise ValueError(
                f"{root / TOKENS_FILE}: expected the tensors {sorted(expected_keys)} for kind {kind!r}, "
                f"found {sorted(tensors)}"
            )
        tokens = tensors["tokens"]
        if tuple(tokens.shape) != (count, *shape):
            raise ValueError(
                f"{root / TOKENS_FILE}: tokens have shape {tuple(tokens.shape)} but {META_FILE} says "
                f"[count, h, w] = {[count, *shape]}; the folder is corrupt or mixed, re-run vqdiffusion tokenize"
            )
        if tokens.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"{root / TOKENS_FILE}: tokens must be an integer tensor, got {tokens.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= k:
            raise ValueError(
                f"{root / TOKENS_FILE}: token values lie in [{low}, {high}] but the codebook has K={k} "
                f"entries (valid: [0, {k - 1}]); the tokens do not belong to this meta.json"
            )
        self.labels: torch.Tensor | None = None
        if kind == "classes":
            labels = tensors["labels"]
            names = meta.get("class_names")
            if not isinstance(names, list) or not names:
                raise ValueError(f"{meta_path}: a class data set needs a non-empty class_names list")
            if tuple(labels.shape) != (count,) or labels.dtype != torch.long:
                raise ValueError(f"{root / TOKENS_FILE}: labels must be [{count}] int64, got {tuple(labels.shape)}")
            if count and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
                raise ValueError(f"{root / TOKENS_FILE}: labels outside [0, {len(names)}) (class_names)")
            self.labels = labels

        records = _read_records(root / CAPTIONS_FILE)
        if len(records) != count:
            raise ValueError(
                f"{root / CAPTIONS_FILE} has {len(records)} records but {META_FILE} says count={count}; "
                "re-run vqdiffusion tokenize"
            )
        self.captions: list[str] | None = None
        if kind == "captions":
            captions = [r.get("caption") for r in records]
            bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
            if bad:
                raise ValueError(f"{root / CAPTIONS_FILE}: record {bad[0]} has no caption")
            self.captions = captions
        self.root = root
        self.meta = meta
        self.tokens = tokens
        self.files = [str(r.get("file", "")) for r in records]

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def num_classes(self) -> int:
        """K, the VQ codebook size."""
        return int(self.meta["num_classes"])

    @property
    def token_shape(self) -> tuple[int, int]:
        h, w = self.meta["token_shape"]
        return int(h), int(w)

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    @property
    def vqvae_dir(self) -> str | None:
        return self.meta.get("vqvae_dir")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"tokens": self.tokens[index].reshape(-1).long(), "index": int(index)}
        if self.captions is not None:
            item["caption"] = self.captions[index]
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item


def _get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, dict) else None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}; re-run vqdiffusion tokenize")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def add_tokenize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tokenize`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "tokenize",
        help="encode an image folder into VQ token files for diffusion training",
        description="Encode every image of DATA_DIR with a VQ-VAE once; writes tokens.safetensors, "
        "captions.jsonl and meta.json to --out.",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="image folder (captions, class folders or plain images)")
    parser.add_argument("--vqvae", required=True, help="exported VQ-VAE folder (e.g. runs/vq/vqvae)")
    parser.add_argument("--out", required=True, help="output folder for the token files")
    parser.add_argument("--kind", default="captions", choices=TOKEN_KINDS, help="data set kind (default captions)")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default: the VQ-VAE's)")
    parser.add_argument("--resize", default="center_crop", choices=RESIZE_MODES, help="default center_crop")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding processes (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing token folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_tokenize(args: argparse.Namespace) -> int:
    """Run ``tokenize``; prints the output folder.  Bad input raises ValueError/FileNotFoundError."""
    out = tokenize_dataset(
        args.data_dir,
        args.vqvae,
        args.out,
        kind=args.kind,
        image_size=args.image_size,
        resize=args.resize,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(out)
    return 0
