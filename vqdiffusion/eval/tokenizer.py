"""Tokenizer diagnostics: does a VQ tokenizer give the denoiser a lean, unambiguous vocabulary?

PSNR alone does not tell.  A tokenizer can reconstruct well while spreading one visual thing (the black
background of the shapes data) over hundreds of interchangeable codes; the denoiser's K-way prediction is then
a guess among equivalent codes.  :func:`tokenizer_diagnostics` measures, on fresh renders of the shapes data
(:mod:`vqdiffusion.data.shapes`, never the images of a data set made with the same seed):

* ``codes_used`` and ``code_perplexity``: distinct codes and ``exp(H)`` of the token histogram
  (:func:`code_perplexity`);
* ``blank_image_codes``: distinct codes of an all-black image (1 is ideal);
* ``background_codes`` and ``background_top1_share``: distinct codes at the positions of the renders whose
  f x f pixel patch is pure black, and the share of those positions taken by the most frequent one (a
  background that is one token has 1 and 1.0; tokens also see their neighbourhood, so some spread is expected);
* ``near_black_codes``: codes whose uniform grid decodes to near-black (:func:`near_black_codes`,
  threshold :data:`NEAR_BLACK_RMS`);
* ``psnr``: reconstruction PSNR of seen and held-out colour-shape pairs (:func:`tokenizer_psnr`).

:func:`tokenizer_shape_ceiling` scores the reconstructions of the shapes suite's scenes with the suite's own
scorer: the fully-correct rate a generator drawing through this tokenizer cannot exceed.

:func:`denoiser_x0_entropy` measures the other side: the mean entropy (nats) of a pipeline denoiser's
``p(x0 | x_t)`` at a few step indices on the canonical prompts of the shapes suite.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..data.shapes import IMAGE_SIZE, PROMPT_SETS, Scene, canonical_caption, prompt_set, render, sample_scene
from .shapes import evaluate
from .stats import format_rate, wilson_interval

__all__ = [
    "NEAR_BLACK_RMS",
    "blank_image_codes",
    "code_perplexity",
    "decode_uniform_grids",
    "default_entropy_steps",
    "denoiser_x0_entropy",
    "format_shape_ceiling",
    "format_tokenizer_diagnostics",
    "format_x0_entropy",
    "near_black_codes",
    "reconstruct",
    "token_histogram",
    "tokenizer_diagnostics",
    "tokenizer_psnr",
    "tokenizer_shape_ceiling",
    "x0_entropy",
]

logger = logging.getLogger(__name__)

# Renders for the tokenizer check use a seed offset, so they are not the training images of a data set
# made with the same seed.
_RENDER_SEED_OFFSET = 1_000_003
#: A code is *near-black* when the image decoded from a uniform grid of it has a root-mean-square pixel value
#: (over all pixels and channels, on the [0, 1] scale, after 8-bit quantisation) of at most this: 0.05, about
#: 13 / 255, i.e. the decoded image is within 26 dB PSNR of pure black.  A shape's colours (darkest channel
#: mean about 0.16 for a small blue object filling its whole grid) are far above it.
NEAR_BLACK_RMS = 0.05


def _num_codes(vqvae: Any) -> int:
    return int(vqvae.config.num_embeddings)


def _token_grid(vqvae: Any, image_size: int) -> tuple[int, int]:
    f = int(vqvae.config.downsample_factor)
    if image_size % f:
        raise ValueError(f"image_size={image_size} is not a multiple of the tokenizer's downsampling factor {f}")
    return image_size // f, image_size // f


def _device(vqvae: Any) -> torch.device:
    return next(vqvae.parameters()).device


def _render_batches(scenes: Sequence[Scene], rng: np.random.Generator, batch_size: int) -> Iterator[torch.Tensor]:
    """Renders of ``scenes`` as ``[B, 3, 64, 64]`` float32 batches in ``[0, 1]``."""
    for i in range(0, len(scenes), batch_size):
        pixels = np.stack(
            [np.asarray(render(scene, rng), dtype=np.float32) / 255.0 for scene in scenes[i : i + batch_size]]
        )
        yield torch.from_numpy(pixels).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------


def token_histogram(tokens: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``counts[k] = #{tokens == k}``: integer tokens of any shape in ``[0, K)`` -> ``[K]`` int64."""
    flat = tokens.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_codes):
        raise ValueError(f"tokens must lie in [0, {num_codes}), got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat.cpu(), minlength=num_codes)


def code_perplexity(counts: torch.Tensor) -> float:
    """``exp(H)``, ``H = -sum_k p_k log p_k`` with ``p = counts / sum(counts)`` (``0 log 0 = 0``): ``[K] -> float``.

    1 when a single code is used, K when all K codes are used equally often.
    """
    counts = counts.double()
    total = float(counts.sum())
    if counts.ndim != 1 or total <= 0 or bool((counts < 0).any()):
        raise ValueError(f"counts must be a [K] histogram of non-negative counts with a positive sum, got {counts}")
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def x0_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each position's distribution: ``log p [B, K, N] -> -sum_k p_k log p_k [B, N]``.

    ``log p`` must be normalised over dim 1 (as the denoiser returns it); ``-inf`` entries count as 0.
    """
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must be [B, K, N], got shape {tuple(log_probs.shape)}")
    log_probs = log_probs.float()
    p = log_probs.exp()
    return -(p * torch.where(p > 0, log_probs, torch.zeros_like(log_probs))).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer measurements
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(vqvae: Any, images: torch.Tensor) -> torch.Tensor:
    """``decode(encode(x))`` of images ``[B, 3, S, S]`` in ``[0, 1]`` on the tokenizer's device -> ``[B, 3, S, S]``
    float32 in ``[0, 1]``, quantised to 8 bits as a saved image is."""
    recon = (vqvae.decode_tokens(vqvae.encode(images * 2 - 1)).float() + 1) / 2
    return (recon.clamp(0, 1) * 255).round() / 255


@torch.no_grad()
def tokenizer_shape_ceiling(
    vqvae: Any, *, num_images_per_set: int = 256, seed: int = 0, batch_size: int = 64, sets: Sequence[str] = PROMPT_SETS
) -> dict[str, Any]:
    """The shapes suite's score of the tokenizer's own reconstructions: the most a generator drawing through
    this tokenizer can reach.

    For each prompt set, the suite's scenes (:func:`~vqdiffusion.data.shapes.prompt_set` with ``seed``, the
    scenes ``vqdiffusion eval`` prompts for) are rendered afresh (a seed offset: not the images of a data set
    made with ``seed``), encoded and decoded (:func:`reconstruct`), and scored against their scenes by
    :func:`vqdiffusion.eval.shapes.evaluate`, the suite's scorer: fully correct under the strict and the lenient
    shape rule, with 95% Wilson intervals (:func:`~vqdiffusion.eval.stats.wilson_interval`).

    Returns ``{"num_images_per_set", "seed", "sets": {name: evaluate's summary + "fully_correct_ci95",
    "lenient_fully_correct_ci95"}}``.
    """
    if num_images_per_set < 1 or batch_size < 1:
        raise ValueError(f"num_images_per_set and batch_size must be >= 1, got {num_images_per_set}, {batch_size}")
    device = _device(vqvae)
    report: dict[str, Any] = {"num_images_per_set": num_images_per_set, "seed": seed, "sets": {}}
    for index, name in enumerate(sets):
        scenes = prompt_set(name, num_images_per_set, seed)
        rng = np.random.default_rng([seed + _RENDER_SEED_OFFSET + 3, index])
        recons = []
        for images in _render_batches(scenes, rng, batch_size):
            recon = reconstruct(vqvae, images.to(device))
            recons += list((recon * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        summary = evaluate(recons, scenes)
        for key in ("fully_correct", "lenient_fully_correct"):
            summary[f"{key}_ci95"] = wilson_interval(round(summary[key] * len(scenes)), len(scenes))
        report["sets"][name] = summary
    logger.info("tokenizer shape ceiling: %s", report)
    return report


def format_shape_ceiling(report: dict[str, Any]) -> str:
    """A markdown table of :func:`tokenizer_shape_ceiling`: per prompt set, fully correct (95% Wilson interval)
    of the reconstructions under the strict and the lenient shape rule, and the strict shape accuracy."""
    lines = [
        "| tokenizer ceiling: prompt set | n | fully correct | fully correct, lenient rule | shape |",
        "|---|---|---|---|---|",
    ]
    for name, s in report["sets"].items():
        n = int(s["n"])
        strict, lenient = round(s["fully_correct"] * n), round(s["lenient_fully_correct"] * n)
        lines.append(f"| {name} | {n} | {format_rate(strict, n)} | {format_rate(lenient, n)} | {s['shape']:.1%} |")
    return "\n".join(lines)


@torch.no_grad()
def tokenizer_psnr(vqvae: Any, *, num_images: int = 256, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Mean per-image PSNR (dB, peak 1 on [0, 1]) of the VQ tokenizer's reconstructions of fresh renders.

    Two sets of ``num_images`` renders: ``"seen_pairs"`` (one or two objects of training colour-shape pairs,
    as the ``single_seen``/``two_objects`` prompt sets) and ``"heldout_pairs"`` (held-out pairs).  The
    reconstruction is quantised to 8 bits, as a saved image is.
    """
    device = next(vqvae.parameters()).device
    rng = np.random.default_rng(seed + _RENDER_SEED_OFFSET)
    half = num_images // 2
    sets = {
        "seen_pairs": prompt_set("single_seen", num_images - half, seed) + prompt_set("two_objects", half, seed),
        "heldout_pairs": prompt_set("heldout", num_images, seed),
    }
    out: dict[str, float] = {}
    for name, scenes in sets.items():
        values = []
        for i in range(0, len(scenes), batch_size):
            pixels = np.stack(
                [np.asarray(render(scene, rng), dtype=np.float32) / 255.0 for scene in scenes[i : i + batch_size]]
            )
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)
            recon = reconstruct(vqvae, images)
            mse = (recon - images).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
            values.append(-10.0 * torch.log10(mse))
        out[name] = float(torch.cat(values).mean())
    return out


@torch.no_grad()
def blank_image_codes(vqvae: Any, image_size: int = IMAGE_SIZE) -> int:
    """Number of distinct codes in the tokens of one all-black ``image_size`` x ``image_size`` image."""
    _token_grid(vqvae, image_size)
    black = -torch.ones(1, 3, image_size, image_size, device=_device(vqvae))
    return int(torch.unique(vqvae.encode(black)).numel())


@torch.no_grad()
def decode_uniform_grids(
    vqvae: Any, codes: torch.Tensor, image_size: int = IMAGE_SIZE, batch_size: int = 64
) -> torch.Tensor:
    """Decode, for each code k of ``codes [M]``, the token grid filled with k: -> ``[M, 3, S, S]`` in ``[0, 1]``,
    quantised to 8 bits."""
    h, w = _token_grid(vqvae, image_size)
    device = _device(vqvae)
    out = []
    for part in codes.long().split(batch_size):
        grid = part.to(device).view(-1, 1, 1).expand(-1, h, w).contiguous()
        images = ((vqvae.decode_tokens(grid).float() + 1) / 2).clamp(0, 1)
        out.append(((images * 255).round() / 255).cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, image_size, image_size)


@torch.no_grad()
def near_black_codes(
    vqvae: Any, *, threshold: float = NEAR_BLACK_RMS, image_size: int = IMAGE_SIZE, batch_size: int = 64
) -> torch.Tensor:
    """The codes (``[M]`` int64, ascending) whose uniform-grid decode has an RMS pixel value ``<= threshold``
    (see :data:`NEAR_BLACK_RMS`)."""
    codes = torch.arange(_num_codes(vqvae))
    images = decode_uniform_grids(vqvae, codes, image_size, batch_size)
    rms = images.double().square().mean(dim=(1, 2, 3)).sqrt()
    return codes[rms <= threshold]


@torch.no_grad()
def tokenizer_diagnostics(
    vqvae: Any,
    *,
    num_images: int = 2000,
    psnr_images: int = 256,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Codebook health of a shapes tokenizer (see the module docstring); a JSON-ready dict.

    Args:
        vqvae: a :class:`~vqdiffusion.models.vqvae.VQVAE` (``encode``, ``decode_tokens``, ``config``).
        num_images: fresh renders (scenes of every colour-shape pair, one or two objects as in training)
            whose tokens give ``codes_used`` and ``code_perplexity``.
        psnr_images: renders per set for :func:`tokenizer_psnr`.
        seed: seeds the scenes (the renders use a seed offset, as :func:`tokenizer_psnr`).

    Returns ``{"num_codes", "num_images", "codes_used", "code_perplexity", "blank_image_codes",
    "background_codes", "background_top1_share", "near_black_codes", "near_black_rms",
    "psnr": {"seen_pairs", "heldout_pairs"}}``.
    """
    if num_images < 1 or psnr_images < 1 or batch_size < 1:
        raise ValueError(
            f"num_images, psnr_images and batch_size must be >= 1, got {num_images}, {psnr_images}, {batch_size}"
        )
    k = _num_codes(vqvae)
    device = _device(vqvae)
    rng = np.random.default_rng(seed + _RENDER_SEED_OFFSET + 1)
    scenes = [sample_scene(rng, split="all") for _ in range(num_images)]
    f = int(vqvae.config.downsample_factor)
    counts = torch.zeros(k, dtype=torch.long)
    background = torch.zeros(k, dtype=torch.long)
    for images in _render_batches(scenes, rng, batch_size):
        tokens = vqvae.encode(images.to(device) * 2 - 1).cpu()
        counts += token_histogram(tokens, k)
        black = torch.nn.functional.max_pool2d(images.amax(dim=1, keepdim=True), f).squeeze(1) == 0  # [B, h, w]
        background += token_histogram(tokens[black], k)
    report = {
        "num_codes": k,
        "num_images": num_images,
        "codes_used": int((counts > 0).sum()),
        "code_perplexity": code_perplexity(counts),
        "blank_image_codes": blank_image_codes(vqvae),
        "background_codes": int((background > 0).sum()),
        "background_top1_share": float(background.max() / background.sum().clamp_min(1)),
        "near_black_codes": int(near_black_codes(vqvae, batch_size=batch_size).numel()),
        "near_black_rms": NEAR_BLACK_RMS,
        "psnr": tokenizer_psnr(vqvae, num_images=psnr_images, seed=seed, batch_size=batch_size),
    }
    logger.info("tokenizer diagnostics: %s", report)
    return report


def format_tokenizer_diagnostics(report: dict[str, Any]) -> str:
    """Two lines (codes used and perplexity; blank-image and near-black codes) for the command line; the
    PSNR is printed with the suite's ``tokenizer_psnr``."""
    return "\n".join(
        [
            f"tokenizer codes used: {report['codes_used']} of {report['num_codes']} "
            f"(perplexity {report['code_perplexity']:.1f}, {report['num_images']} fresh renders)",
            f"tokenizer blank-image codes: {report['blank_image_codes']}; near-black codes: "
            f"{report['near_black_codes']} (uniform-grid decode RMS <= {report['near_black_rms']}); black patches: "
            f"{report['background_codes']} codes, the top one {report['background_top1_share']:.0%}",
        ]
    )


# ---------------------------------------------------------------------------------------------------------
# Denoiser measurement
# ---------------------------------------------------------------------------------------------------------


def default_entropy_steps(num_timesteps: int) -> list[int]:
    """``[T - 1, T // 2, T // 10]`` (duplicates removed, descending)."""
    return sorted({num_timesteps - 1, num_timesteps // 2, num_timesteps // 10}, reverse=True)


@torch.no_grad()
def denoiser_x0_entropy(
    pipe: Any,
    *,
    steps: Sequence[int] | None = None,
    num_per_set: int = 32,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Mean entropy (nats) of a pipeline denoiser's ``p(x0 | x_t)`` on the shapes suite's canonical prompts.

    For the scenes of every prompt set (``num_per_set`` each, :func:`~vqdiffusion.data.shapes.prompt_set`),
    x0 are the tokens of a fresh render, ``x_t ~ q(x_t | x0)`` (``pipe.schedule.q_sample``), and the text
    condition is the canonical caption; the prediction is the conditional one (no guidance).  For each step
    index t of ``steps`` (default :func:`default_entropy_steps`): ``all`` is the mean over every position,
    ``masked`` over the [MASK] positions of x_t (NaN when there is none).  ``log_num_codes`` = log K is the
    entropy of a uniform guess.

    Returns ``{"steps": [...], "log_num_codes": float, "by_step": {str(t): {"all", "masked"}}}``.
    """
    schedule, denoiser, vqvae = pipe.schedule, pipe.denoiser, pipe.vqvae
    num_t = int(schedule.num_timesteps)
    steps = default_entropy_steps(num_t) if steps is None else [int(t) for t in steps]
    bad = [t for t in steps if not 0 <= t < num_t]
    if bad or not steps:
        raise ValueError(f"steps must be step indices in [0, {num_t}), got {list(steps)}")
    if pipe.condition_kind not in ("text", "none"):
        raise ValueError(f"denoiser_x0_entropy needs a text (or unconditional) pipeline, got {pipe.condition_kind!r}")
    device = pipe.device
    rng = np.random.default_rng(seed + _RENDER_SEED_OFFSET + 2)
    generator = torch.Generator(device=device).manual_seed(seed)
    scenes = [scene for name in PROMPT_SETS for scene in prompt_set(name, num_per_set, seed)]
    sums = {t: [0.0, 0, 0.0, 0] for t in steps}  # all-sum, all-count, masked-sum, masked-count
    for i, images in enumerate(_render_batches(scenes, rng, batch_size)):
        x0 = vqvae.encode(images.to(_device(vqvae)) * 2 - 1).to(device).flatten(1)  # [B, N]
        batch_scenes = scenes[i * batch_size : i * batch_size + x0.shape[0]]
        cond = None
        if pipe.condition_kind == "text":
            cond = pipe.encode_prompt([canonical_caption(scene) for scene in batch_scenes])
        for t in steps:
            x_t = schedule.q_sample(x0, t, generator)
            entropy = x0_entropy(denoiser(x_t, t, cond))  # [B, N]
            masked = x_t == schedule.mask_id
            acc = sums[t]
            acc[0] += float(entropy.double().sum())
            acc[1] += entropy.numel()
            acc[2] += float(entropy.double()[masked].sum())
            acc[3] += int(masked.sum())
    by_step = {str(t): {"all": a / n, "masked": (m / c) if c else float("nan")} for t, (a, n, m, c) in sums.items()}
    return {"steps": steps, "log_num_codes": float(np.log(schedule.num_classes)), "by_step": by_step}


def format_x0_entropy(report: dict[str, Any]) -> str:
    """One line: entropy of p(x0 | x_t) per step index."""
    parts = [f"t={t} {v['all']:.3f} (masked {v['masked']:.3f})" for t, v in report["by_step"].items()]
    return f"denoiser x0 entropy, nats (uniform = {report['log_num_codes']:.3f}): " + ", ".join(parts)
