"""The token folder: a data set encoded into VQ tokens once (``vqdiffusion tokenize``), read and written here.

:func:`write_token_folder` writes ``out_dir`` with three files:

* ``tokens.safetensors``: ``tokens`` ``[N, h, w]`` (int16 when the codebook has K <= 32767 entries, else
  int32, see :func:`token_dtype`), values in ``[0, K)``; plus ``labels`` ``[N]`` int64 for class folders.
* ``captions.jsonl``: one JSON object per item, index-aligned with ``tokens``: ``{"file": relative path}``
  plus ``"caption"`` (``kind="captions"``) or ``"label"`` (``kind="classes"``).
* ``meta.json``: ``format``/``format_version``, ``kind``, ``count``, ``num_classes`` (K), ``token_shape``
  ``[h, w]``, ``dtype``, ``image_size``, ``resize``, ``data_dir`` and ``vqvae_dir`` (absolute paths),
  ``vqvae_config``, ``class_names`` (class folders, else null) and ``skipped`` (``[path, reason]`` pairs of
  files that could not be used).  It is written last: a folder without it is an incomplete run.

:class:`TokenDataset` reads such a folder back and checks it (shapes, dtype, value range, item counts),
raising errors that name the file at fault.  The encoder driver is :mod:`vqdiffusion.training.tokenize`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..io import atomic_write_text, load_weights, save_safetensors
from ..models.conditions import ConditionKind

__all__ = [
    "CAPTIONS_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_FILE",
    "TOKENS_FILE",
    "TOKEN_KINDS",
    "TokenDataset",
    "token_dtype",
    "write_token_folder",
]

TOKEN_KINDS = ("captions", "classes", "unconditional")
# The data kind of a token folder (``tokenize --kind``) -> what a model trained on it is conditioned on.
CONDITION_OF_DATA_KIND = {
    "captions": ConditionKind.TEXT,
    "classes": ConditionKind.CLASS,
    "unconditional": ConditionKind.NONE,
}
TOKENS_FILE = "tokens.safetensors"
CAPTIONS_FILE = "captions.jsonl"
META_FILE = "meta.json"
FORMAT_NAME = "vqdiffusion.tokens"
FORMAT_VERSION = 1
_INT16_MAX_CLASSES = 32767


def token_dtype(num_classes: int) -> torch.dtype:
    """The stored token dtype for a codebook of ``num_classes`` entries: int16 up to 32767, else int32."""
    return torch.int16 if num_classes <= _INT16_MAX_CLASSES else torch.int32


def write_token_folder(
    out_dir: str | os.PathLike,
    tokens: torch.Tensor,
    records: Sequence[dict[str, Any]],
    *,
    kind: str,
    num_classes: int,
    image_size: int,
    resize: str,
    data_dir: str | os.PathLike,
    vqvae_dir: str | os.PathLike,
    vqvae_config: dict[str, Any],
    class_names: Sequence[str] | None = None,
    skipped: Sequence[tuple[Any, Any]] = (),
) -> Path:
    """Write a token folder (see the module docstring); returns ``out_dir``.

    ``tokens`` is ``[N, h, w]`` (stored as :func:`token_dtype`); ``records`` holds N dicts with ``"file"``
    (relative to ``data_dir``) and ``"caption"`` (``kind="captions"``) or ``"label"`` (``kind="classes"``,
    also stored as the ``labels`` tensor).  An existing ``meta.json`` is removed first and the new one is
    written last, so an interrupted overwrite leaves a folder that readers refuse.
    """
    if kind not in TOKEN_KINDS:
        raise ValueError(f"kind must be one of {list(TOKEN_KINDS)}, got {kind!r}")
    if tokens.ndim != 3 or tokens.shape[0] != len(records):
        raise ValueError(f"tokens must be [N, h, w] with N = {len(records)} records, got {tuple(tokens.shape)}")
    if (kind == "classes") != (class_names is not None):
        raise ValueError(f"class_names are given for kind='classes' and only then (kind={kind!r})")
    dtype = token_dtype(num_classes)
    tensors = {"tokens": tokens.to("cpu", dtype)}
    if kind == "classes":
        tensors["labels"] = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # an overwritten folder is incomplete until the new meta lands
    save_safetensors(tensors, out / TOKENS_FILE)
    atomic_write_text(out / CAPTIONS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "count": len(records),
        "num_classes": num_classes,
        "token_shape": [int(tokens.shape[1]), int(tokens.shape[2])],
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": image_size,
        "resize": resize,
        "data_dir": str(Path(data_dir).resolve()),
        "vqvae_dir": str(Path(vqvae_dir).resolve()),
        "vqvae_config": vqvae_config,
        "class_names": list(class_names) if class_names is not None else None,
        "skipped": [[str(path), str(reason)] for path, reason in skipped],
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out


class TokenDataset(Dataset):
    """A token folder written by :func:`write_token_folder`, checked on load.

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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
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
        """The folder's data kind: "captions", "classes" or "unconditional" (``tokenize --kind``)."""
        return str(self.meta["kind"])

    @property
    def condition_kind(self) -> ConditionKind:
        """What a model trained on these tokens is conditioned on (text, class labels, nothing)."""
        return CONDITION_OF_DATA_KIND[self.kind]

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
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    return records
