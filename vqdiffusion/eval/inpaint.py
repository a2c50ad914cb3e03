"""The ``inpaint`` suite: how well a model edits one object of a two-object shapes scene.

Each case is a rendered two-object scene of the training split with a rectangular pixel mask over one
object (its placement's bounding box grown by :data:`MASK_MARGIN` px).  Two prompt sets share the cases:

* ``"replace"``: the scene with the masked object replaced by a different training-split colour-shape pair
  of the same size at the same place (the other object named unchanged);
* ``"restore"``: the original scene (the same object back).

For every known-token mode (``"renoise"``, ``"clean"``; see :meth:`VQDiffusionPipeline.inpaint`) each output is
scored with the independent detector of :mod:`vqdiffusion.eval.shapes`: ``kept_intact`` (the object outside
the mask is still seen with its shape, colour and position), ``requested_correct`` (the object asked for in
the mask is seen with every attribute right), ``both``, each with a 95% Wilson interval, and
``psnr_outside``: PSNR of the output against the tokenizer's reconstruction of the input over the pixels
outside the token mask dilated by one token (what the edit should leave alone).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    SHAPES,
    Placement,
    Scene,
    ShapeObject,
    canonical_caption,
    draw_placements,
    is_feasible,
    layout,
    placement_coverage,
    placements_separated,
    sample_scene,
)
from ..editing import dilate_tokens, token_mask
from ..io import atomic_write_text, atomic_write_with, check_output_path
from .shapes import detect
from .stats import format_rate, wilson_interval

__all__ = [
    "INPAINT_SETS",
    "MASK_MARGIN",
    "PSNR_CAP",
    "InpaintCase",
    "evaluate_inpainting",
    "examples_figure",
    "format_inpaint_table",
    "inpaint_cases",
    "mask_box",
    "masked_psnr",
    "outcome",
    "outside_region",
    "rate_summary",
    "reconstruction_reference",
    "write_inpaint_report",
]

INPAINT_SETS: tuple[str, ...] = ("replace", "restore")
#: Pixels (of a 64 x 64 image) by which the masked object's bounding box is grown on every side.
MASK_MARGIN = 2.0
#: PSNR reported for an exact match (keeps the report finite and JSON-valid).
PSNR_CAP = 100.0
METRICS: tuple[str, ...] = ("kept_intact", "requested_correct", "both")
_TRAIN_PAIRS = tuple((color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in HELD_OUT_PAIRS)
_MAX_TRIES = 1000


@dataclass(frozen=True)
class InpaintCase:
    """One edit: the original ``placements`` (64-px geometry, caption order), the ``index`` of the masked
    object and the ``replacement`` asked for in the ``"replace"`` set."""

    placements: tuple[Placement, ...]
    index: int
    replacement: ShapeObject

    @property
    def scene(self) -> Scene:
        return Scene(tuple(p.obj for p in self.placements))

    @property
    def kept(self) -> ShapeObject:
        return self.placements[1 - self.index].obj

    @property
    def masked(self) -> ShapeObject:
        return self.placements[self.index].obj

    def target(self, name: str) -> Scene:
        """The scene prompted for in set ``name`` (``"replace"`` or ``"restore"``)."""
        if name == "restore":
            return self.scene
        if name != "replace":
            raise ValueError(f"set must be one of {INPAINT_SETS}, got {name!r}")
        objects = list(self.scene.objects)
        objects[self.index] = self.replacement
        return Scene(tuple(objects))

    def prompt(self, name: str) -> str:
        """The canonical caption of :meth:`target`."""
        return canonical_caption(self.target(name))

    def box(self, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
        """The masked pixel rectangle (x0, y0, x1, y1), ends exclusive, in a ``size`` x ``size`` image."""
        return mask_box(self.placements[self.index], MASK_MARGIN, size)

    def mask(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """[size, size] bool, True inside :meth:`box` (the pixels to regenerate)."""
        x0, y0, x1, y1 = self.box(size)
        out = np.zeros((size, size), dtype=bool)
        out[y0:y1, x0:x1] = True
        return out

    def render(self, size: int = IMAGE_SIZE, name: str | None = None) -> Image.Image:
        """The input image (``name`` None) or the ideal output of set ``name``: the same placements with the
        masked object swapped for the requested one."""
        objects = self.scene.objects if name is None else self.target(name).objects
        return draw_placements(
            _scaled(tuple(_with_object(p, o) for p, o in zip(self.placements, objects, strict=True)), size), size
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene": self.scene.to_list(),
            "masked_index": self.index,
            "replacement": self.replacement.to_dict(),
            "box": list(self.box()),
            "prompts": {name: self.prompt(name) for name in INPAINT_SETS},
        }


def _with_object(p: Placement, obj: ShapeObject) -> Placement:
    return Placement(obj, p.cx, p.cy, p.extent)


def _scaled(placements: tuple[Placement, ...], size: int) -> tuple[Placement, ...]:
    k = size / IMAGE_SIZE
    return tuple(Placement(p.obj, p.cx * k, p.cy * k, p.extent * k) for p in placements)


def mask_box(placement: Placement, margin: float, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1; ends exclusive) touching the placement's bounding box grown by ``margin``
    64-px units, in a ``size`` x ``size`` image."""
    k = size / IMAGE_SIZE
    x0, y0, x1, y1 = (v * k for v in placement.bbox)
    m = margin * k
    return (
        max(0, math.floor(x0 - m)),
        max(0, math.floor(y0 - m)),
        min(size, math.ceil(x1 + m)),
        min(size, math.ceil(y1 + m)),
    )


def inpaint_cases(n: int, seed: int) -> list[InpaintCase]:
    """``n`` cases, deterministic by ``seed``: two-object training-split scenes where the masked rectangle
    touches no pixel of the kept object, and a replacement (a different training pair, same size and place)
    that still leaves the two objects apart."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    cases: list[InpaintCase] = []
    for _ in range(n * _MAX_TRIES):
        if len(cases) == n:
            break
        case = _draw_case(rng)
        if case is not None:
            cases.append(case)
    if len(cases) < n:  # pragma: no cover - practically impossible
        raise RuntimeError("could not draw enough inpainting cases")
    return cases


def _draw_case(rng: np.random.Generator) -> InpaintCase | None:
    """One candidate case, or None when its mask would touch the kept object or no replacement fits."""
    scene = sample_scene(rng, num_objects=2, split="train")
    placements = layout(scene, rng)
    index = int(rng.integers(2))
    kept = placement_coverage(placements[1 - index], IMAGE_SIZE) > 0
    x0, y0, x1, y1 = mask_box(placements[index], MASK_MARGIN)
    if kept[y0:y1, x0:x1].any():
        return None
    masked = placements[index].obj
    for k in rng.permutation(len(_TRAIN_PAIRS)):
        color, shape = _TRAIN_PAIRS[int(k)]
        if (color, shape) == (masked.color, masked.shape):
            continue
        replacement = ShapeObject(shape, color, masked.size, masked.position)
        swapped = list(placements)
        swapped[index] = _with_object(placements[index], replacement)
        if is_feasible(Scene(tuple(p.obj for p in swapped))) and placements_separated(swapped):
            return InpaintCase(tuple(placements), index, replacement)
    return None


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def outcome(kept: ShapeObject, requested: ShapeObject, detected: Scene) -> dict[str, bool]:
    """``kept_intact``: some detected object has the kept object's shape, colour and position;
    ``requested_correct``: some detected object equals the requested one (shape, colour, size, position);
    ``both``."""
    kept_ok = any((o.shape, o.color, o.position) == (kept.shape, kept.color, kept.position) for o in detected.objects)
    requested_ok = requested in detected.objects
    return {"kept_intact": kept_ok, "requested_correct": requested_ok, "both": kept_ok and requested_ok}


def masked_psnr(output: torch.Tensor, reference: torch.Tensor, region: torch.Tensor) -> float | None:
    """PSNR (dB, peak 1) of ``output`` against ``reference`` ([3, H, W] in [0, 1]) over the pixels where
    ``region`` ([H, W] bool) is True; None for an empty region, :data:`PSNR_CAP` for an exact match."""
    count = int(region.sum())
    if count == 0:
        return None
    mse = float(((output.double() - reference.double()) ** 2)[:, region].mean())
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10.0 * math.log10(mse)


def outside_region(pixel_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, H, W] bool: the pixels outside the token mask of ``pixel_mask`` dilated by one token."""
    grown = dilate_tokens(token_mask(pixel_mask, factor), 1)
    return ~grown.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def rate_summary(successes: int, trials: int) -> dict[str, Any]:
    """``{"rate", "successes", "n", "ci95": [low, high]}`` (Wilson 95%)."""
    low, high = wilson_interval(successes, trials)
    return {"rate": successes / trials, "successes": successes, "n": trials, "ci95": [low, high]}


def _psnr_summary(values: list[float | None]) -> dict[str, Any]:
    finite = [v for v in values if v is not None]
    if not finite:
        return {"mean": None, "min": None, "n": 0}
    return {"mean": float(np.mean(finite)), "min": float(min(finite)), "n": len(finite)}


# ---------------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------------


def _generators(seed: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per case, the same for every set and mode (paired comparisons)."""
    states = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(count)]
    return [torch.Generator(device=device).manual_seed(s) for s in states]


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def evaluate_inpainting(
    pipe: Any,
    n: int = 64,
    seed: int = 0,
    modes: tuple[str, ...] = ("renoise", "clean"),
    *,
    batch_size: int = 16,
    progress: bool = True,
    num_examples: int = 4,
    **sampling: Any,
) -> dict[str, Any]:
    """Run the inpainting suite with ``pipe`` (a :class:`~vqdiffusion.VQDiffusionPipeline` or a stand-in
    with ``inpaint``, ``encode_images``, ``decode``, ``image_size``, ``device`` and ``vqvae.config``).

    ``sampling`` goes to every ``pipe.inpaint`` call; every case has its own generator, the same in every set
    and mode.  Returns ``{"sets": {set: {mode: summary}}, "cases": [...], "kept_touches_token_mask",
    "seconds_per_image", "settings", "samples", ...}`` where a summary holds ``"kept_intact"``,
    ``"requested_correct"``, ``"both"`` and ``"kept_intact_apart"`` (:func:`rate_summary`) and
    ``"psnr_outside"`` (``{"mean", "min", "n"}``).  ``"kept_touches_token_mask"`` is the fraction of scenes
    whose kept object reaches into a regenerated token (so the model must redraw part of it);
    ``"kept_intact_apart"`` is ``kept_intact`` over the other scenes (None when there are none).
    ``"reconstruction"`` (:func:`reconstruction_reference`) scores the tokenizer's reconstructions of the inputs.
    ``"samples"`` (PIL images of the first ``num_examples`` cases, for :func:`write_inpaint_report`) is the
    only part that is not JSON-serialisable.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
    if not modes:
        raise ValueError("modes must name at least one known-token mode")
    width, height = pipe.image_size
    if width != height:
        raise ValueError(f"the shapes suite needs square images, the model makes {width}x{height}")
    size, factor = width, pipe.vqvae.config.downsample_factor
    cases = inpaint_cases(n, seed)
    images = torch.stack(
        [torch.from_numpy(np.asarray(c.render(size), np.float32) / 255).permute(2, 0, 1) for c in cases]
    )
    masks = torch.from_numpy(np.stack([c.mask(size) for c in cases]))
    outside = outside_region(masks, factor)
    reference = torch.cat(
        [pipe.decode(pipe.encode_images(images[i : i + batch_size])).float().cpu() for i in range(0, n, batch_size)]
    )
    kept_token = token_mask(_kept_pixels(cases, size), factor)
    touches = (kept_token & token_mask(masks, factor)).flatten(1).any(1)

    report: dict[str, Any] = {
        "n": n,
        "seed": seed,
        "modes": list(modes),
        "mask_margin_px": MASK_MARGIN,
        "settings": dict(sampling),
        "kept_touches_token_mask": float(touches.float().mean()),
        "sets": {},
        "cases": [c.to_dict() for c in cases],
    }
    samples: dict[str, Any] = {
        "inputs": [_to_pil(x) for x in images[:num_examples]],
        "masks": [Image.fromarray(m.numpy().astype(np.uint8) * 255, mode="L") for m in masks[:num_examples]],
        "prompts": {name: [c.prompt(name) for c in cases[:num_examples]] for name in INPAINT_SETS},
        "outputs": {},
    }
    report["reconstruction"] = reconstruction_reference(cases, reference)
    total, start = 0, time.perf_counter()
    for name in INPAINT_SETS:
        report["sets"][name], samples["outputs"][name] = {}, {}
        prompts = [c.prompt(name) for c in cases]
        for mode in modes:
            generators = _generators(seed, n, pipe.device)
            outputs = []
            for i in range(0, n, batch_size):
                out = pipe.inpaint(
                    prompts[i : i + batch_size],
                    images[i : i + batch_size],
                    masks[i : i + batch_size],
                    known_tokens=mode,
                    generator=generators[i : i + batch_size],
                    output_type="pt",
                    progress=progress,
                    **sampling,
                ).images
                outputs.append(out.float().cpu())
            result = torch.cat(outputs)
            total += n
            counts = dict.fromkeys(METRICS, 0)
            kept_apart = 0
            psnrs = []
            for k, case in enumerate(cases):
                detected = detect(result[k].numpy())
                requested = case.target(name).objects[case.index]
                hit = outcome(case.kept, requested, detected)
                for metric in METRICS:
                    counts[metric] += hit[metric]
                kept_apart += hit["kept_intact"] and not bool(touches[k])
                psnr = masked_psnr(result[k], reference[k], outside[k])
                psnrs.append(psnr)
                report["cases"][k]["kept_touches_token_mask"] = bool(touches[k])
                report["cases"][k].setdefault("results", {}).setdefault(name, {})[mode] = {
                    **hit,
                    "detected": detected.to_list(),
                    "psnr_outside": psnr,
                }
            summary: dict[str, Any] = {metric: rate_summary(counts[metric], n) for metric in METRICS}
            apart = n - int(touches.sum())
            summary["kept_intact_apart"] = rate_summary(kept_apart, apart) if apart else None
            summary["psnr_outside"] = _psnr_summary(psnrs)
            report["sets"][name][mode] = summary
            samples["outputs"][name][mode] = [_to_pil(x) for x in result[:num_examples]]
    report["seconds_per_image"] = (time.perf_counter() - start) / total
    report["samples"] = samples
    return report


def reconstruction_reference(cases: list[InpaintCase], reference: torch.Tensor) -> dict[str, Any]:
    """The metrics of the ``"restore"`` set on the tokenizer's reconstructions of the inputs ([B, 3, H, W]):
    what an inpainter that changed no token would score, the ceiling the tokenizer sets."""
    counts = dict.fromkeys(METRICS, 0)
    for case, image in zip(cases, reference, strict=True):
        hit = outcome(case.kept, case.masked, detect(image.numpy()))
        for metric in METRICS:
            counts[metric] += hit[metric]
    return {metric: rate_summary(counts[metric], len(cases)) for metric in METRICS}


def _kept_pixels(cases: list[InpaintCase], size: int) -> torch.Tensor:
    """[B, size, size] bool: the pixels the kept object covers."""
    return torch.from_numpy(
        np.stack([placement_coverage(_scaled((c.placements[1 - c.index],), size)[0], size) > 0 for c in cases])
    )


def format_inpaint_table(report: dict[str, Any]) -> str:
    """A markdown table: one row per set and known-token mode, rates with their 95% Wilson intervals."""
    lines = [
        "| set | known tokens | n | kept intact | requested correct | both | kept intact, apart from the token mask "
        "| PSNR outside (mean / min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, modes in report["sets"].items():
        for mode, s in modes.items():
            rates = " | ".join(format_rate(s[m]["successes"], s[m]["n"]) for m in METRICS)
            psnr = s["psnr_outside"]
            psnr_text = "n/a" if psnr["mean"] is None else f"{psnr['mean']:.2f} / {psnr['min']:.2f} dB"
            apart = s.get("kept_intact_apart")
            apart_text = "n/a" if apart is None else f"{format_rate(apart['successes'], apart['n'])} of {apart['n']}"
            lines.append(f"| {name} | {mode} | {s['kept_intact']['n']} | {rates} | {apart_text} | {psnr_text} |")
    if "reconstruction" in report:
        s = report["reconstruction"]
        rates = " | ".join(format_rate(s[m]["successes"], s[m]["n"]) for m in METRICS)
        lines.append(f"| tokenizer reconstruction of the input | - | {s['kept_intact']['n']} | {rates} | - | - |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Report files
# ---------------------------------------------------------------------------------------------------------

_TILE = 128
_GAP = 4
_LABEL = 14


def examples_figure(samples: dict[str, Any]) -> Image.Image:
    """Rows of (input, mask, one output per known-token mode), one row per example case and set, each under a
    line with the set and its prompt; column names on top."""
    from PIL import ImageDraw

    modes = list(next(iter(samples["outputs"].values())))
    columns = ["input", "mask", *modes]
    rows = [(name, k) for k in range(len(samples["inputs"])) for name in samples["outputs"]]
    width = len(columns) * (_TILE + _GAP) + _GAP
    height = _LABEL + len(rows) * (_LABEL + _TILE + _GAP) + _GAP
    figure = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(figure)
    for c, title in enumerate(columns):
        draw.text((_GAP + c * (_TILE + _GAP), 2), title, fill=(230, 230, 230))
    for r, (name, k) in enumerate(rows):
        top = _LABEL + r * (_LABEL + _TILE + _GAP)
        draw.text((_GAP, top + 2), f"{name}: {samples['prompts'][name][k]}", fill=(200, 200, 120))
        tiles = [samples["inputs"][k], samples["masks"][k].convert("RGB")]
        tiles += [samples["outputs"][name][mode][k] for mode in modes]
        for c, tile in enumerate(tiles):
            scaled = tile.resize((_TILE, _TILE), Image.Resampling.NEAREST)
            figure.paste(scaled, (_GAP + c * (_TILE + _GAP), top + _LABEL))
    return figure


def write_inpaint_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` (without images) and ``inpaint_examples.png`` (:func:`examples_figure`)."""
    out = Path(out_dir)
    check_output_path(out, folder=True)
    json_path = out / "report.json"
    data = {k: v for k, v in report.items() if k != "samples"}
    atomic_write_text(json_path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    figure_path = out / "inpaint_examples.png"
    atomic_write_with(figure_path, examples_figure(report["samples"]).save)
    return json_path, figure_path
