"""A folder of numbered samples for evaluation (``vqdiffusion sample-set``): PNGs and a manifest, resumable.

Image ``i`` (file ``{i:06d}.png``) has the condition ``conditions[(i // images_per_prompt) % len(conditions)]``
(a caption, a class label, or nothing for unconditional models) and is sampled with its own generator,
``torch.Generator(device).manual_seed(seed + i)``.  A pipeline call with one generator per image gives an
image that does not depend on the batch it is in, so image ``i`` is the same whether the run is done at
once, in pieces, with another batch size or over any number of processes, and a run that stopped resumes
by skipping the files that are done (each PNG is written atomically; an empty or unreadable file, e.g. one
cut short by a copy, counts as missing and is sampled again).

Under ``torchrun`` the images still missing are dealt out over the ranks (rank r takes every world_size-th
of them), so the files are the same whatever the number of processes, and a rerun may use another number.

``manifest.json`` holds the settings (model, every sampling option, seed rule, device, dtype, the conditions'
count and hash; for aMUSEd models the resolved micro-conditions), where the conditions came from, the number
of processes of the last run (``world_size``), whether every planned image is written (``complete``), and one
entry per planned image (``file``, ``index``, ``seed`` and ``prompt`` or ``label``). Rank 0 alone writes it:
before sampling, and again with ``complete`` after every rank has written its images. A run into a folder
whose manifest has other
settings is refused rather than mixing two distributions; ``world_size`` is not a setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..devices import available_memory, format_bytes
from ..io import atomic_write_text, atomic_write_with
from ..models.conditions import ConditionKind
from ..training.distributed import DistributedContext
from .folder import MANIFEST_FILE, read_manifest

__all__ = [
    "MANIFEST_FORMAT",
    "SEED_RULE",
    "image_file",
    "is_complete_image",
    "parse_labels",
    "read_prompts",
    "write_sample_set",
]

MANIFEST_FORMAT = "vqdiffusion-sample-set"
MANIFEST_VERSION = 1
SEED_RULE = "image i is sampled with torch.Generator(device).manual_seed(seed + i)"


def image_file(index: int) -> str:
    return f"{index:06d}.png"


def read_prompts(path: str | os.PathLike, *, first_caption_per_image: bool = False) -> list[str]:
    """Captions from a text file (one per line; blank lines skipped) or a JSON file: COCO-style captions
    (``{"annotations": [{"image_id": ..., "caption": ...}, ...]}``, in file order) or a list of strings.

    ``first_caption_per_image`` keeps one caption per COCO ``image_id`` (its first in the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            prompts, seen = [], set()
            for number, ann in enumerate(data["annotations"]):
                if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                    raise ValueError(f"{path}: annotation {number} has no 'caption' string")
                image_id = ann.get("image_id")
                if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, (int, str))):
                    raise ValueError(
                        f"{path}: annotation {number} has image_id {image_id!r}; COCO image ids are numbers (or "
                        "strings)"
                    )
                if first_caption_per_image:
                    if ann.get("image_id") in seen:
                        continue
                    seen.add(ann.get("image_id"))
                prompts.append(" ".join(ann["caption"].split()))
        elif isinstance(data, list) and all(isinstance(p, str) for p in data):
            prompts = [" ".join(p.split()) for p in data]
        else:
            raise ValueError(f"{path}: expected COCO captions ({{'annotations': [...]}}) or a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


# More class labels than any class-conditional model has (ImageNet: 1000); a longer list is a typo.
MAX_LABELS = 1_000_000
# Memory of one planned image in the manifest while it is built (its dict and its JSON text), an upper estimate.
_MANIFEST_BYTES_PER_IMAGE = 1000


def parse_labels(text: str) -> list[int]:
    """Class labels from ``"0-999"``, ``"1,5,7"`` or a mix (``"0-9,207"``); ranges include both ends (at most
    :data:`MAX_LABELS` labels in all)."""
    labels: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            first, last = (int(low), int(high)) if dash else (int(part), int(part))
        except ValueError:
            first, last = 1, 0
        if first > last:
            raise ValueError(f"--class-labels: {part!r} is not a label or a range a-b (e.g. 0-999 or 1,5,7)")
        if len(labels) + last + 1 - first > MAX_LABELS:
            raise ValueError(f"--class-labels: {text!r} gives more than {MAX_LABELS} labels")
        labels.extend(range(first, last + 1))
    if any(label < 0 for label in labels):
        raise ValueError("--class-labels: labels must be >= 0")
    return labels


def _conditions_hash(conditions: list[str] | list[int] | None) -> str:
    return hashlib.sha256(json.dumps(conditions).encode("utf-8")).hexdigest()


def _check_conditions(pipe: Any, conditions: list[str] | list[int] | None) -> None:
    kind = pipe.condition_kind
    if kind == ConditionKind.TEXT and not (conditions and all(isinstance(c, str) for c in conditions)):
        raise ValueError("this model is a text model: give captions (--prompts FILE)")
    if kind == ConditionKind.CLASS:
        if not conditions or not all(isinstance(c, int) and not isinstance(c, bool) for c in conditions):
            raise ValueError(
                f"this model is class-conditional: give labels (--class-labels 0-{pipe.num_class_labels - 1})"
            )
        bad = [c for c in conditions if c >= pipe.num_class_labels]
        if bad:
            raise ValueError(f"--class-labels: {bad[0]} is not a label of this model (0..{pipe.num_class_labels - 1})")
    if kind == ConditionKind.NONE and conditions is not None:
        raise ValueError("this model is unconditional: give only --num-images N (no --prompts or --class-labels)")


def is_complete_image(path: Path) -> bool:
    """Whether ``path`` is a readable image: a missing, empty or damaged file (PIL's check of its structure
    and checksums fails) is not, and is sampled again on a rerun."""
    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError):  # PIL's errors for unreadable or damaged files
        return False
    return True


def write_sample_set(
    pipe: Any,
    out_dir: str | os.PathLike,
    *,
    conditions: list[str] | list[int] | None,
    num: int | None = None,
    images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    sampling: dict[str, Any] | None = None,
    model: str = "",
    conditions_source: str | None = None,
    progress: bool = True,
    world: DistributedContext | None = None,
) -> dict[str, Any]:
    """Sample images ``0 .. num - 1`` into ``out_dir`` (see the module docstring), skipping those already there.

    ``num`` defaults to ``len(conditions) * images_per_prompt``; it is required for an unconditional model
    (``conditions=None``).  ``sampling`` holds the pipeline's sampling keywords and the model's own condition
    keywords (aMUSEd's micro-conditions); the model's defaults fill the rest and the manifest records the
    resolved values.  Under ``torchrun`` every process calls this with its
    ``world`` (:func:`vqdiffusion.training.distributed.setup_distributed`): rank 0 checks and writes the
    manifest, the images still missing are dealt out over the ranks, each writes its own, and after a
    barrier rank 0 marks the manifest complete.  Returns ``{"written", "skipped", "num", "out_dir"}``
    (``written`` counts every rank's images).
    """
    world = world or DistributedContext()
    # the checks that read nothing but the arguments run on every rank and fail alike
    _check_conditions(pipe, conditions)
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"--images-per-prompt and --batch-size must be >= 1, got {images_per_prompt}, {batch_size}")
    if num is None:
        if conditions is None:
            raise ValueError("an unconditional model needs --num-images N")
        num = len(conditions) * images_per_prompt
    if num < 1:
        raise ValueError(f"--num-images must be >= 1, got {num}")
    sampling = dict(sampling or {})
    condition = {name: sampling.pop(name) for name in pipe.condition_keywords if name in sampling}
    options = pipe.sampling_options(**sampling)
    settings = {
        "model": model,
        "condition": str(pipe.condition_kind.value),
        "sampling": options.to_dict(),
        "seed": seed,
        "seed_rule": SEED_RULE,
        "images_per_prompt": images_per_prompt,
        "device": pipe.device.type,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "conditions": None
        if conditions is None
        else {"count": len(conditions), "sha256": _conditions_hash(conditions)},
    }
    if pipe.condition_keywords:  # aMUSEd's micro-conditions, resolved (a VQ-Diffusion manifest has no such key)
        settings["micro_conditions"] = pipe.condition_settings(**condition)
    sampling.update(condition)  # the pipeline takes them as call keywords
    out = Path(out_dir)

    def condition(i: int) -> str | int | None:
        return None if conditions is None else conditions[(i // images_per_prompt) % len(conditions)]

    # rank 0 reads the folder and writes the manifest; the others raise its error too rather than wait
    manifest: dict[str, Any] | None = None
    failure: BaseException | None = None
    if world.main:
        try:
            manifest = _start_manifest(out, settings, num, seed, condition, conditions_source, world.world_size)
        except Exception as err:  # every rank must hear of it: the collective below is the only way
            failure = err
    failure = world.broadcast(failure)
    if failure is not None:
        raise failure

    # which images are missing: each rank checks every world_size-th file, all ranks get the sorted union
    mine = [i for i in range(world.rank, num, world.world_size) if not is_complete_image(out / image_file(i))]
    pending = sorted(i for part in world.all_gather(mine) for i in part)
    share = pending[world.rank :: world.world_size]
    bar = tqdm(total=len(share), desc="sample-set", unit="img", disable=not (progress and world.main))
    for start in range(0, len(share), batch_size):
        chunk = share[start : start + batch_size]
        generators = [torch.Generator(device=pipe.device).manual_seed(seed + i) for i in chunk]
        if conditions is None:
            result = pipe(None, num_images_per_prompt=len(chunk), generator=generators, progress=False, **sampling)
        else:
            prompts = [condition(i) for i in chunk]
            result = pipe(prompts, generator=generators, progress=False, **sampling)
        for i, image in zip(chunk, result.images, strict=True):
            atomic_write_with(out / image_file(i), lambda tmp, image=image: image.save(tmp, format="PNG"))
        bar.update(len(chunk))
    bar.close()
    world.barrier()
    if manifest is not None:  # rank 0, once every rank has written its images
        manifest["complete"] = all(is_complete_image(out / e["file"]) for e in manifest["images"][num:])
        atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return {"written": len(pending), "skipped": num - len(pending), "num": num, "out_dir": str(out)}


def _start_manifest(
    out: Path,
    settings: dict[str, Any],
    num: int,
    seed: int,
    condition: Callable[[int], str | int | None],
    conditions_source: str | None,
    world_size: int,
) -> dict[str, Any]:
    """Check ``out`` against its manifest (if any), write the manifest of this run (``complete`` false) and
    return it."""
    free = available_memory("cpu")
    if free is not None and num * _MANIFEST_BYTES_PER_IMAGE > 0.5 * free:
        raise ValueError(
            f"--num-images {num}: the manifest of {num} images needs about "
            f"{format_bytes(num * _MANIFEST_BYTES_PER_IMAGE)} of memory, but "
            f"{format_bytes(free)} are available; sample fewer images (--num-images)"
        )
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    old = read_manifest(out)
    total = num
    if old is not None:
        _check_same_settings(out, old.get("settings"), settings)
        total = max(num, len(old["images"]))

    def entry(i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"file": image_file(i), "index": i, "seed": seed + i}
        c = condition(i)
        if isinstance(c, str):
            item["prompt"] = c
        elif c is not None:
            item["label"] = c
        return item

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "settings": settings,
        "conditions_source": conditions_source,  # where they came from; not compared on resume (the hash is)
        "world_size": world_size,  # processes of the last run into the folder; not compared on resume
        "complete": False,  # true once every image of "images" is written
        "images": [entry(i) for i in range(total)],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_same_settings(out: Path, old: Any, new: dict[str, Any]) -> None:
    if old == new:
        return
    if not isinstance(old, dict):
        raise ValueError(f"{out / MANIFEST_FILE} has no settings; use another --out")
    key = min(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    there, now = old.get(key), new.get(key)
    if isinstance(there, dict) and isinstance(now, dict):
        inner = min(k for k in set(there) | set(now) if there.get(k) != now.get(k))
        key, there, now = f"{key}.{inner}", there.get(inner), now.get(inner)
    raise ValueError(
        f"{out} was sampled with other settings ({key}: {json.dumps(there)} there, {json.dumps(now)} now); use "
        "another --out, or the same settings to resume"
    )
