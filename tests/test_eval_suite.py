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


class RenderingPipeline:
    """Draws exactly what each prompt asks for (a perfect model), or black images."""

    device = torch.device("cpu")

    def __init__(self, perfect: bool) -> None:
        self.perfect = perfect
        self.calls: list[dict] = []

    def __call__(self, prompts, generator=None, output_type="pil", progress=True, **kwargs):
        self.calls.append(kwargs)
        rng = np.random.default_rng(0)
        images = [render(parse_caption(p), rng) if self.perfect else Image.new("RGB", (64, 64)) for p in prompts]
        return SimpleNamespace(images=images)


def test_perfect_model_scores_one_and_blank_model_zero(tmp_path: Path) -> None:
    perfect = evaluate_shapes(RenderingPipeline(True), num_per_set=10, batch_size=4, progress=False)
    for summary in perfect["sets"].values():
        assert summary["n"] == 10 and summary["fully_correct"] == 1.0 and summary["color"] == 1.0
    blank = RenderingPipeline(False)
    report = evaluate_shapes(blank, num_per_set=5, batch_size=4, progress=False, num_inference_steps=7)
    assert all(s["fully_correct"] == 0.0 and s["count"] == 0.0 for s in report["sets"].values())
    assert blank.calls[0] == {"num_inference_steps": 7}
    json_path, grid_path = write_report(perfect, tmp_path)
    data = json.loads(json_path.read_text())
    assert set(data["sets"]) == {"single_seen", "two_objects", "heldout"}
    assert Image.open(grid_path).size == (8 * 64, 3 * 64)
    assert "| heldout | 10 | 100.0% |" in format_table(perfect)
