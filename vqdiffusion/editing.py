"""Editing on the token chain: inpainting, outpainting and variation (docs/design.md §10).

Pure functions over tensors.  Known tokens are observed values of x0: the reverse chain fills only the
other positions, and the model sees the known ones either clean (``"clean"``) or re-noised to the current
step with q(x_t | x0) before every call (``"renoise"``, inputs like those it was trained on).  A variation
starts the chain from x_t ~ q(x_t | x0(image)) at the step that ``strength`` names.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .diffusion import Generator, MaskReplaceSchedule, q_sample, select_positions, spaced_timesteps

KNOWN_TOKEN_MODES = ("renoise", "clean")
DEFAULT_KNOWN_TOKEN_MODE = "renoise"


@dataclasses.dataclass(frozen=True)
class KnownTokens:
    """Observed x0 values of an edit.

    tokens: [B, N] long in [0, K), the encoded image (read only where ``known``).
    known: [B, N] bool, True where the output must equal ``tokens``.
    mode: what the model sees at the known positions, ``"renoise"`` (x_t ~ q(x_t | x0) drawn afresh before
        every model call) or ``"clean"`` (x0 itself).
    """

    tokens: torch.Tensor
    known: torch.Tensor
    mode: str = DEFAULT_KNOWN_TOKEN_MODE

    def __post_init__(self) -> None:
        if self.mode not in KNOWN_TOKEN_MODES:
            raise ValueError(f"known_tokens must be one of {list(KNOWN_TOKEN_MODES)}, got {self.mode!r}")
        if self.tokens.ndim != 2 or self.known.shape != self.tokens.shape:
            raise ValueError(
                f"tokens and known must both be [B, N], got {tuple(self.tokens.shape)} and {tuple(self.known.shape)}"
            )
        if self.known.dtype != torch.bool:
            raise ValueError(f"known must be a bool tensor, got dtype {self.known.dtype}")

    def rows(self, start: int, stop: int) -> KnownTokens:
        """The same observation for batch rows ``start:stop``."""
        return KnownTokens(self.tokens[start:stop], self.known[start:stop], self.mode)


def keep_known(x: torch.Tensor, known: KnownTokens | None) -> torch.Tensor:
    """``x`` [B, N] with the known positions set to their x0 value (``x`` itself when nothing is known)."""
    return x if known is None else torch.where(known.known, known.tokens, x)


def model_input(
    x_t: torch.Tensor,
    known: KnownTokens | None,
    schedule: MaskReplaceSchedule,
    t: int,
    generator: Generator = None,
) -> torch.Tensor:
    """What the denoiser sees at step index ``t``: the chain's state ``x_t`` [B, N] at the unknown positions;
    at the known ones x0 (``"clean"``) or a fresh draw of q(x_t | x0) (``"renoise"``: [MASK] with
    probability gbar_t, a uniform token with K bbar_t, else x0; docs/design.md §3.4)."""
    if known is None:
        return x_t
    if known.mode == "clean":
        return keep_known(x_t, known)
    return torch.where(known.known, q_sample(schedule, known.tokens, t, generator), x_t)


def token_mask(pixel_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The tokens to regenerate: ``[B, H, W]`` bool pixels (True = regenerate) -> ``[B, H/f, W/f]`` bool, True
    where the token's f x f patch holds any True pixel (docs/design.md §10.1)."""
    if pixel_mask.ndim != 3 or pixel_mask.dtype != torch.bool:
        shape, dtype = tuple(pixel_mask.shape), pixel_mask.dtype
        raise ValueError(f"pixel_mask must be a [B, H, W] bool tensor, got {shape} {dtype}")
    B, H, W = pixel_mask.shape
    if H % factor or W % factor:
        raise ValueError(f"mask size {W}x{H} is not a multiple of the tokenizer's factor {factor}")
    return pixel_mask.view(B, H // factor, factor, W // factor, factor).any(dim=4).any(dim=2)


def dilate_tokens(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """``[B, h, w]`` bool grown by ``radius`` tokens in every direction (8-neighbourhood, square)."""
    if radius <= 0:
        return mask
    size = 2 * radius + 1
    grown = torch.nn.functional.max_pool2d(mask[:, None].float(), size, stride=1, padding=radius)
    return grown[:, 0] > 0


def variation_start_step(strength: float, num_timesteps: int) -> int:
    """The step index at which a variation of ``strength`` in (0, 1] starts: ceil(strength * T) - 1, so 1 is
    the chain's first step T - 1 (plain generation) and small strengths start near x0."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (1 = plain generation), got {strength!r}")
    return max(0, min(num_timesteps - 1, math.ceil(strength * num_timesteps - 1e-9) - 1))


def variation_timesteps(strength: float, num_timesteps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """The steps of a variation: those of a full ``num_steps`` run (``spacing``) below the start step, after
    the start step itself; at strength 1 exactly the full run's steps."""
    start = variation_start_step(strength, num_timesteps)
    later = [t for t in spaced_timesteps(num_timesteps, num_steps, spacing) if t < start]
    return [start, *later]


def variation_start(
    schedule: MaskReplaceSchedule,
    x0: torch.Tensor,
    t: int,
    exact_count: bool = False,
    generator: Generator = None,
) -> torch.Tensor:
    """The start x_t of a variation at step index ``t`` from the image's tokens ``x0`` [B, N].

    For the ancestral-type samplers a draw of q(x_t | x0) (the chain's own marginal).  A sampler that keeps
    every unmasked token and fills a fixed number per step (``exact_count``: its ``fills_fixed_count``) starts
    from exactly round(N gbar_t) masked positions of each row, drawn uniformly without replacement (the count
    it expects at t; for a mask-only schedule the q(x_t | x0) draw conditioned on its expected count).
    """
    if not exact_count:
        return q_sample(schedule, x0, t, generator)
    B, N = x0.shape
    count = round(N * schedule.cumulative_at(t)[2])
    chosen = select_positions(torch.ones((B, N), device=x0.device), count, generator)
    return torch.where(chosen, torch.full_like(x0, schedule.mask_id), x0)


def place_on_canvas(
    image: torch.Tensor, canvas_hw: tuple[int, int], offset: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outpainting's inputs: ``image`` [3, h, w] placed with its top-left corner at ``offset`` = (x, y)
    pixels (negative: partly off the canvas) on a black canvas of (H, W) = ``canvas_hw``.

    Returns (canvas [3, H, W], mask [H, W] bool: True where the canvas is not covered by the image).
    """
    if image.ndim != 3:
        raise ValueError(f"image must be [3, h, w], got shape {tuple(image.shape)}")
    H, W = canvas_hw
    _, h, w = image.shape
    x, y = offset
    left, top, right, bottom = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if left >= right or top >= bottom:
        raise ValueError(
            f"the image ({w}x{h}) placed at offset ({x}, {y}) does not overlap the {W}x{H} canvas; "
            f"use offsets in ({-w}, {W}) x ({-h}, {H})"
        )
    canvas = torch.zeros((image.shape[0], H, W), dtype=image.dtype, device=image.device)
    canvas[:, top:bottom, left:right] = image[:, top - y : bottom - y, left - x : right - x]
    mask = torch.ones((H, W), dtype=torch.bool, device=image.device)
    mask[top:bottom, left:right] = False
    return canvas, mask

