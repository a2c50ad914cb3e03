"""Write docs/builtin_grid.png: real outputs of the built-in model, one row per prompt, the prompt under it.

    python scripts/readme_grid.py [--model builtin:shapes] [--out docs/builtin_grid.png]

Uses the model's default sampling settings and seed 0; images are upscaled 2x (nearest) for the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vqdiffusion import VQDiffusionPipeline

PROMPTS = [
    "a large red circle in the top left",
    "a small blue square in the bottom right",
    "a large yellow triangle in the center",
    "a small green circle in the top and a large white square in the bottom",
    "a large purple triangle in the left",  # held-out colour-shape pair
    "a large cyan square in the right",  # held-out colour-shape pair
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--out", default="docs/builtin_grid.png")
    parser.add_argument("--per-prompt", type=int, default=6)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()

    pipe = VQDiffusionPipeline.from_pretrained(args.model)
    out = pipe(PROMPTS, num_images_per_prompt=args.per_prompt, generator=torch.Generator().manual_seed(0))
    side = out.images[0].size[0] * args.scale
    caption_h, pad = 18, 4
    width = args.per_prompt * (side + pad) + pad
    height = len(PROMPTS) * (side + caption_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, prompt in enumerate(PROMPTS):
        y = pad + row * (side + caption_h + pad)
        for col in range(args.per_prompt):
            image = out.images[row * args.per_prompt + col].resize((side, side), Image.NEAREST)
            canvas.paste(image, (pad + col * (side + pad), y))
        note = "  (held-out pair)" if "purple triangle" in prompt or "cyan square" in prompt else ""
        draw.text((pad, y + side + 3), f'"{prompt}"{note}', fill=(0, 0, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
