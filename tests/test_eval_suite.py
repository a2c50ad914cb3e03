"""The shapes evaluation suite end to end with stand-in pipelines whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from vqdiffusion.data.shapes import parse_caption, render
from vqdiffusion.eval.suite import evaluate_shapes, format_table, write_report
from vqdiffusion.eval.tokenizer import tokenizer_psnr


class BlackTokenizer(torch.nn.Module):
    """A stand-in VQ-VAE that records what it encodes and decodes every token grid to black."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        return torch.zeros(images.shape[0], 8, 8, dtype=torch.long)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return -torch.ones(tokens.shape[0], 3, 64, 64)


class RenderingPipeline:
    """Draws exactly what each prompt asks for (a perfect model), or black images."""

    device = torch.device("cpu")

    def __init__(self, perfect: bool) -> None:
        self.perfect = perfect
        self.calls: list[dict] = []
        self.vqvae = BlackTokenizer()

    def __call__(self, prompts, generator=None, output_type="pil", progress=True, **kwargs):
        self.calls.append(kwargs)
        rng = np.random.default_rng(0)
        images = [render(parse_caption(p), rng) if self.perfect else Image.new("RGB", (64, 64)) for p in prompts]
        return SimpleNamespace(images=images)


def test_perfect_model_scores_one_and_blank_model_zero(tmp_path: Path) -> None:
    perfect = evaluate_shapes(RenderingPipeline(True), num_per_set=10, batch_size=4, progress=False, diagnostics=False)
    for summary in perfect["sets"].values():
        assert summary["n"] == 10 and summary["fully_correct"] == 1.0 and summary["color"] == 1.0
    blank = RenderingPipeline(False)
    report = evaluate_shapes(
        blank, num_per_set=5, batch_size=4, progress=False, diagnostics=False, num_inference_steps=7
    )
    assert all(s["fully_correct"] == 0.0 and s["count"] == 0.0 for s in report["sets"].values())
    assert blank.calls[0] == {"num_inference_steps": 7}
    json_path, grid_path = write_report(perfect, tmp_path)
    data = json.loads(json_path.read_text())
    assert set(data["sets"]) == {"single_seen", "two_objects", "heldout"}
    assert Image.open(grid_path).size == (8 * 64, 3 * 64)
    # fully correct with its Wilson interval (10 of 10: [72.2, 100]), strict and lenient shape rule
    table = format_table(perfect)
    assert "| heldout | 10 | 100.0% [72.2, 100.0] |" in table
    assert table.splitlines()[2].endswith("| 100.0% [72.2, 100.0] |")
    assert data["sets"]["heldout"]["lenient_fully_correct"] == 1.0
    assert set(data["tokenizer_psnr"]) == {"seen_pairs", "heldout_pairs"}


def test_tokenizer_psnr_of_fresh_renders() -> None:
    tokenizer = BlackTokenizer()
    psnr = tokenizer_psnr(tokenizer, num_images=6, seed=0, batch_size=4)
    assert set(psnr) == {"seen_pairs", "heldout_pairs"}
    seen = (torch.cat(tokenizer.seen[:2]) + 1) / 2, (torch.cat(tokenizer.seen[2:]) + 1) / 2  # [0, 1] renders
    for name, images in zip(("seen_pairs", "heldout_pairs"), seen, strict=True):
        assert images.shape == (6, 3, 64, 64) and images.amax() > 0.5  # real renders, not black
        expected = (-10 * np.log10(images.double().square().mean(dim=(1, 2, 3)).numpy())).mean()  # vs black
        assert abs(psnr[name] - expected) < 1e-4
    # fresh renders: not the images of a data set made with the same seed
    from vqdiffusion.data.shapes import prompt_set

    rng = np.random.default_rng(0)
    same_seed = np.asarray(render(prompt_set("single_seen", 1, 0)[0], rng), dtype=np.float32) / 255
    assert not np.allclose(same_seed, seen[0][0].permute(1, 2, 0).numpy())
