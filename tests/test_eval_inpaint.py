"""The inpaint suite: case construction on known scenes, the report of a tiny random pipeline, and stand-in
pipelines whose answers are known (a perfect inpainter reaches 100%, an identity one gets no replacement)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from support.weights import tiny_text_components

from vqdiffusion.cli import main
from vqdiffusion.data.shapes import (
    HELD_OUT_PAIRS,
    POSITION_CELLS,
    Placement,
    Scene,
    ShapeObject,
    canonical_caption,
    draw_placements,
    parse_caption,
    placement_coverage,
)
from vqdiffusion.eval.inpaint import (
    MASK_MARGIN,
    PSNR_CAP,
    InpaintCase,
    evaluate_inpainting,
    format_inpaint_table,
    inpaint_cases,
    masked_psnr,
    outcome,
    outside_region,
    write_inpaint_report,
)
from vqdiffusion.eval.shapes import detect
from vqdiffusion.formats.ours import save_ours
from vqdiffusion.pipeline import VQDiffusionPipeline

RED_CIRCLE = ShapeObject("circle", "red", "large", "top left")
BLUE_SQUARE = ShapeObject("square", "blue", "small", "bottom right")
GREEN_TRIANGLE = ShapeObject("triangle", "green", "large", "top left")
KNOWN = InpaintCase(
    (Placement(RED_CIRCLE, 13.0, 13.0, 24.0), Placement(BLUE_SQUARE, 52.0, 52.0, 12.0)), 0, GREEN_TRIANGLE
)


# -- cases ---------------------------------------------------------------------------------------------------


def test_known_case_mask_and_prompts() -> None:
    assert KNOWN.box() == (0, 0, 27, 27)  # bbox (1, 1, 25, 25) grown by 2 px, clipped at 0
    assert KNOWN.box(8) == (0, 0, 4, 4)  # the same rectangle in an 8 x 8 image
    mask = KNOWN.mask()
    assert mask.sum() == 27 * 27 and mask[:27, :27].all()
    assert KNOWN.prompt("restore") == "a large red circle in the top left and a small blue square in the bottom right"
    assert (
        KNOWN.prompt("replace") == "a large green triangle in the top left and a small blue square in the bottom right"
    )
    assert KNOWN.kept == BLUE_SQUARE and KNOWN.masked == RED_CIRCLE
    # the ideal outputs are what the scorer reads back
    assert detect(KNOWN.render()) == KNOWN.scene
    assert detect(KNOWN.render(name="replace")) == KNOWN.target("replace")
    with pytest.raises(ValueError, match="set must be one of"):
        KNOWN.target("swap")


def test_drawn_cases_mask_the_chosen_object_only_and_replace_it() -> None:
    cases = inpaint_cases(24, seed=3)
    assert cases == inpaint_cases(24, seed=3) and cases != inpaint_cases(24, seed=4)
    assert {case.index for case in cases} == {0, 1}
    for case in cases:
        mask = case.mask()
        masked = placement_coverage(case.placements[case.index], 64) > 0
        kept = placement_coverage(case.placements[1 - case.index], 64) > 0
        assert mask[masked].all() and not mask[kept].any()
        old, new = case.masked, case.replacement
        assert (new.shape, new.color) != (old.shape, old.color)
        assert (new.size, new.position) == (old.size, old.position)
        assert (new.color, new.shape) not in HELD_OUT_PAIRS
        assert all((o.color, o.shape) not in HELD_OUT_PAIRS for o in case.scene.objects)
        replace, restore = case.prompt("replace"), case.prompt("restore")
        assert replace != restore and restore == canonical_caption(case.scene)
        assert parse_caption(replace).objects[1 - case.index] == case.kept  # the kept object, named unchanged
        assert canonical_caption(Scene((case.kept,))) in replace
        assert parse_caption(replace).objects[case.index] == new


def test_metric_helpers() -> None:
    detected = Scene((ShapeObject("circle", "red", "small", "top left"), BLUE_SQUARE))
    assert outcome(RED_CIRCLE, BLUE_SQUARE, detected) == {"kept_intact": True, "requested_correct": True, "both": True}
    assert outcome(GREEN_TRIANGLE, RED_CIRCLE, detected) == {
        "kept_intact": False,
        "requested_correct": False,  # the size is wrong
        "both": False,
    }
    a = torch.zeros(3, 4, 4)
    b = a.clone()
    b[:, 0, 0] = 0.1
    region = torch.zeros(4, 4, dtype=torch.bool)
    assert masked_psnr(a, b, region) is None
    region[1:, :] = True
    assert masked_psnr(a, b, region) == PSNR_CAP
    region[0, 0] = True
    assert masked_psnr(a, b, region) == pytest.approx(-10 * np.log10(0.01 / 13))
    pixels = torch.zeros(1, 8, 8, dtype=torch.bool)
    pixels[0, 0, 0] = True  # token (0, 0) of 4 x 4; dilated: tokens (0..1, 0..1) = pixels 0..3
    outside = outside_region(pixels, 2)
    assert not outside[0, :4, :4].any() and outside[0, 4:, :].all() and outside[0, :, 4:].all()


# -- stand-in pipelines -------------------------------------------------------------------------------------


class StandIn:
    """Inpaints by rule: ``perfect`` draws the object the prompt names at the masked place (from the mask's
    rectangle and the prompt only), otherwise returns the input unchanged.  Its tokenizer is the identity."""

    device = torch.device("cpu")
    image_size = (64, 64)
    vqvae = SimpleNamespace(config=SimpleNamespace(downsample_factor=8))

    def __init__(self, perfect: bool) -> None:
        self.perfect = perfect
        self.calls: list[dict] = []

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.clone()

    def inpaint(self, prompts, images, masks, *, known_tokens, generator, output_type, progress, **sampling):
        assert output_type == "pt" and len(generator) == len(prompts) == len(images) == len(masks)
        self.calls.append({"known_tokens": known_tokens, "rows": len(prompts), **sampling})
        out = images.clone()
        if self.perfect:
            for k, (prompt, mask) in enumerate(zip(prompts, masks, strict=True)):
                out[k] = self.draw_placements(parse_caption(prompt), out[k], mask.numpy())
        return SimpleNamespace(images=out)

    @staticmethod
    def draw_placements(scene: Scene, image: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        cell = (int(cy // (64 / 3)), int(cx // (64 / 3)))
        (obj,) = [o for o in scene.objects if POSITION_CELLS[o.position] == cell]
        extent = min(x1 - x0, y1 - y0) - 2 * MASK_MARGIN
        drawn = torch.from_numpy(np.asarray(draw_placements((Placement(obj, cx, cy, extent),), 64), np.float32) / 255)
        keep = torch.from_numpy(~mask)
        return torch.where(keep, image, drawn.permute(2, 0, 1))


def test_perfect_inpainter_reaches_the_maximum(tmp_path: Path) -> None:
    pipe = StandIn(perfect=True)
    report = evaluate_inpainting(pipe, n=12, seed=1, batch_size=5, progress=False, num_inference_steps=7)
    assert [c["known_tokens"] for c in pipe.calls] == ["renoise"] * 3 + ["clean"] * 3 + ["renoise"] * 3 + ["clean"] * 3
    assert [c["rows"] for c in pipe.calls[:3]] == [5, 5, 2] and pipe.calls[0]["num_inference_steps"] == 7
    for name in ("replace", "restore"):
        for mode in ("renoise", "clean"):
            summary = report["sets"][name][mode]
            for metric in ("kept_intact", "requested_correct", "both"):
                assert summary[metric]["rate"] == 1.0 and summary[metric]["successes"] == 12
                assert summary[metric]["ci95"][1] == 1.0 and summary[metric]["ci95"][0] > 0.7
            assert summary["psnr_outside"] == {"mean": PSNR_CAP, "min": PSNR_CAP, "n": 12}
    json_path, figure_path = write_inpaint_report(report, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert "samples" not in data and len(data["cases"]) == 12
    assert data["cases"][0]["results"]["replace"]["clean"]["both"] is True
    assert Image.open(figure_path).size[0] == 4 * (128 + 4) + 4
    assert all(report["reconstruction"][m]["rate"] == 1.0 for m in ("kept_intact", "requested_correct", "both"))
    table = format_inpaint_table(report)
    assert "| replace | renoise | 12 | 100.0% [75.8, 100.0] |" in table


def test_identity_inpainter_never_makes_the_replacement() -> None:
    report = evaluate_inpainting(StandIn(perfect=False), n=10, seed=2, modes=("clean",), progress=False)
    assert set(report["sets"]["replace"]) == {"clean"}
    replace, restore = report["sets"]["replace"]["clean"], report["sets"]["restore"]["clean"]
    assert replace["requested_correct"]["rate"] == 0.0 and replace["both"]["rate"] == 0.0
    assert replace["requested_correct"]["ci95"][0] == 0.0 and 0.0 < replace["requested_correct"]["ci95"][1] < 0.35
    assert replace["kept_intact"]["rate"] == 1.0
    assert restore["requested_correct"]["rate"] == 1.0 and restore["both"]["rate"] == 1.0


# -- a tiny random pipeline ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_clip_dirs) -> VQDiffusionPipeline:
    return VQDiffusionPipeline.from_components(tiny_text_components(tiny_clip_dirs))


def test_report_of_a_random_pipeline(tiny_pipe: VQDiffusionPipeline) -> None:
    report = evaluate_inpainting(tiny_pipe, n=3, seed=0, batch_size=2, progress=False, num_inference_steps=2)
    assert set(report["sets"]) == {"replace", "restore"}
    for modes in report["sets"].values():
        assert set(modes) == {"renoise", "clean"}
        for summary in modes.values():
            for metric in ("kept_intact", "requested_correct", "both"):
                s = summary[metric]
                assert s["n"] == 3 and s["successes"] == round(3 * s["rate"])
                assert 0.0 <= s["ci95"][0] <= s["rate"] <= s["ci95"][1] <= 1.0
            assert summary["both"]["successes"] <= min(
                summary["kept_intact"]["successes"], summary["requested_correct"]["successes"]
            )
            psnr = summary["psnr_outside"]
            assert psnr["n"] == 0 or psnr["min"] <= psnr["mean"]
    json.dumps({k: v for k, v in report.items() if k != "samples"}, allow_nan=False)
    assert report["samples"]["inputs"][0].size == (8, 8)
    # per-image generators: the outputs do not depend on the batching
    one = evaluate_inpainting(tiny_pipe, n=3, modes=("renoise",), batch_size=1, progress=False, num_inference_steps=2)
    batched, single = (
        report["samples"]["outputs"]["replace"]["renoise"],
        one["samples"]["outputs"]["replace"]["renoise"],
    )
    assert [np.asarray(x).tolist() for x in batched] == [np.asarray(x).tolist() for x in single]
    for a, b in zip(report["cases"], one["cases"], strict=True):  # the same tokens; float decoding may differ
        a, b = dict(a["results"]["replace"]["renoise"]), dict(b["results"]["replace"]["renoise"])
        assert a.pop("psnr_outside") == pytest.approx(b.pop("psnr_outside"), abs=1e-3) and a == b


def test_cli_inpaint_suite(tiny_pipe: VQDiffusionPipeline, tmp_path: Path, capsys) -> None:
    save_ours(tiny_pipe.components, tmp_path / "model")
    out = tmp_path / "eval"
    argv = ["eval", "--suite", "inpaint", "--model", str(tmp_path / "model"), "--n", "2", "--steps", "2", "--quiet"]
    assert main([*argv, "--known-tokens", "clean", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| replace | clean | 2 |" in printed and "wall time" in printed
    data = json.loads((out / "report.json").read_text())
    assert set(data["sets"]["restore"]) == {"clean"} and data["settings"]["num_inference_steps"] == 2
    assert (out / "inpaint_examples.png").is_file()
    assert main([*argv, "--known-tokens", "clean,foo", "--out", str(tmp_path / "bad")]) == 2
    assert "--known-tokens" in capsys.readouterr().err
