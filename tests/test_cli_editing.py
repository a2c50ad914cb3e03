"""``vqdiffusion inpaint`` / ``outpaint`` / ``variation`` on tiny random models: the files written equal a
direct pipeline call with the same seed, and every bad input is one ``error:`` line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.weights import TINY_VQ_CONFIG, tiny_text_components

from vqdiffusion.cli import main
from vqdiffusion.diffusion import MaskReplaceSchedule
from vqdiffusion.editing import token_mask
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.models.denoiser import Denoiser, DenoiserConfig
from vqdiffusion.models.vqvae import VQVAE
from vqdiffusion.pipeline import VQDiffusionPipeline
from vqdiffusion.sampling import SamplingOptions

SIZE = 8  # the tiny models' images: 4x4 tokens of 2x2 pixels


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_clip_dirs) -> dict[str, Path]:
    """A tiny text model, a class-conditional and an unconditional one, and input images and masks."""
    root = tmp_path_factory.mktemp("cli_editing")
    VQDiffusionPipeline.from_components(tiny_text_components(tiny_clip_dirs)).save_pretrained(root / "text")
    torch.manual_seed(1)
    vqvae, schedule = VQVAE(TINY_VQ_CONFIG), MaskReplaceSchedule.paper_mask_and_replace(16, 100)
    for name, denoiser in (
        ("class", DenoiserConfig.preset("tiny", cond_dim=None, num_class_labels=5)),
        ("uncond", DenoiserConfig.preset("tiny", cond_dim=None)),
    ):
        VQDiffusionPipeline.from_components(
            PipelineComponents(
                vqvae=vqvae,
                denoiser=Denoiser(denoiser),
                schedule=schedule,
                null_class_label=4 if name == "class" else None,
                defaults=SamplingOptions(num_inference_steps=3, guidance_scale=1.0),
            )
        ).save_pretrained(root / name)
    rng = np.random.default_rng(0)

    def save(name: str, array: np.ndarray, mode: str | None = None) -> None:
        Image.fromarray(array, mode=mode).save(root / name)

    save("image.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    save("big.png", rng.integers(0, 256, (2 * SIZE, 2 * SIZE, 3), dtype=np.uint8))
    save("small.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:4, :4] = 255  # the top-left 2x2 tokens
    save("mask.png", mask, "L")
    save("big_mask.png", np.kron(mask, np.ones((2, 2), np.uint8)), "L")
    gray = mask.copy()
    gray[gray == 255] = 200
    gray[6, 6] = 60  # below 0.5: kept
    save("gray_mask.png", gray, "L")
    save("empty_mask.png", np.zeros((SIZE, SIZE), np.uint8), "L")
    save("full_mask.png", np.full((SIZE, SIZE), 255, np.uint8), "L")
    dotted = np.zeros((SIZE, SIZE), np.uint8)
    dotted[::2, ::2] = 255  # one white pixel in every 2x2 token patch
    save("dotted_mask.png", dotted, "L")
    (root / "broken.png").write_text("not an image")
    return {p.stem if p.is_file() else p.name: p for p in root.iterdir()}


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_inpaint_equals_the_pipeline_and_keeps_the_unmasked_tokens(files, tmp_path, capsys) -> None:
    out = tmp_path / "inpainted.png"
    code, stdout, err = run(
        capsys, "inpaint", "a red circle", "--image", files["image"], "--mask", files["mask"],
        "--model", files["text"], "--seed", 3, "--output", out, "--quiet", "--known-tokens", "clean",
    )  # fmt: skip
    assert code == 0, err
    assert str(out) in stdout and Image.open(out).size == (SIZE, SIZE)
    pipe = VQDiffusionPipeline.from_pretrained(files["text"])
    image, mask = Image.open(files["image"]), Image.open(files["mask"])
    kwargs = {"known_tokens": "clean", "progress": False}
    direct = pipe.inpaint(
        "a red circle", image, mask, generator=torch.Generator().manual_seed(3), output_type="pil", **kwargs
    )
    assert np.array_equal(pixels(out), np.asarray(direct.images[0]))
    tokens = pipe.inpaint(
        "a red circle", image, mask, generator=torch.Generator().manual_seed(3), output_type="tokens", **kwargs
    ).tokens
    assert torch.equal(tokens, direct.tokens)
    kept = ~token_mask(torch.from_numpy(np.asarray(mask) >= 128)[None], 2)
    x0 = pipe.encode_images(torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1)[None].float())
    assert torch.equal(tokens[kept], x0[kept])


def test_inpaint_box_grid_and_folder(files, tmp_path, capsys) -> None:
    grid = tmp_path / "grid.png"
    common = ["inpaint", "a red circle", "--image", files["image"], "--box", "0,0,4,4", "--model", files["text"]]
    code, _, err = run(capsys, *common, "--num-images", 4, "--output", grid, "--quiet")
    assert code == 0, err
    assert Image.open(grid).size == (2 * SIZE, 2 * SIZE)
    folder = tmp_path / "many"
    code, _, err = run(capsys, *common, "--num-images", 2, "--output", folder, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png"]
    # the box is the same mask as mask.png: the same images
    single = tmp_path / "box.png"
    assert run(capsys, *common, "--output", single, "--quiet")[0] == 0
    by_mask = tmp_path / "mask.png"
    common[4:6] = ["--mask", files["mask"]]
    assert run(capsys, *common, "--output", by_mask, "--quiet")[0] == 0
    assert np.array_equal(pixels(single), pixels(by_mask))


def test_inpaint_resize_and_gray_mask_notes(files, tmp_path, capsys) -> None:
    out = tmp_path / "resized.png"
    code, _, err = run(
        capsys, "inpaint", "a red circle", "--image", files["big"], "--mask", files["big_mask"], "--resize",
        "--model", files["text"], "--output", out, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert "note: resized --image" in err and "16x16 to 8x8" in err and "nearest" in err
    assert Image.open(out).size == (SIZE, SIZE)
    out = tmp_path / "gray.png"
    code, _, err = run(
        capsys, "inpaint", "a red circle", "--image", files["image"], "--mask", files["gray_mask"],
        "--model", files["text"], "--output", out, "--quiet", "--seed", 5,
    )  # fmt: skip
    assert code == 0, err
    assert "thresholded at 0.5" in err and "Traceback" not in err
    binary = tmp_path / "binary.png"
    args = ["--model", files["text"], "--output", binary, "--quiet", "--seed", 5]
    assert run(capsys, "inpaint", "a red circle", "--image", files["image"], "--mask", files["mask"], *args)[0] == 0
    assert np.array_equal(pixels(out), pixels(binary))  # 200 -> regenerate, 60 -> keep: mask.png


def test_outpaint_equals_the_pipeline(files, tmp_path, capsys) -> None:
    out = tmp_path / "outpainted.png"
    code, _, err = run(
        capsys, "outpaint", "a red circle", "--image", files["small"], "--offset=-2,2", "--model", files["text"],
        "--seed", 2, "--output", out, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    pipe = VQDiffusionPipeline.from_pretrained(files["text"])
    direct = pipe.outpaint(
        "a red circle", Image.open(files["small"]), offset=(-2, 2), generator=torch.Generator().manual_seed(2),
        progress=False,
    )  # fmt: skip
    assert np.array_equal(pixels(out), np.asarray(direct.images[0]))


def test_variation_equals_the_pipeline(files, tmp_path, capsys) -> None:
    out = tmp_path / "variation.png"
    code, _, err = run(
        capsys, "variation", "a red circle", "--image", files["image"], "--strength", 0.5, "--model", files["text"],
        "--seed", 4, "--steps", 2, "--output", out, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    pipe = VQDiffusionPipeline.from_pretrained(files["text"])
    direct = pipe.variation(
        "a red circle", Image.open(files["image"]), 0.5, generator=torch.Generator().manual_seed(4),
        num_inference_steps=2, progress=False,
    )  # fmt: skip
    assert np.array_equal(pixels(out), np.asarray(direct.images[0]))


def test_class_and_unconditional_models(files, tmp_path, capsys) -> None:
    out = tmp_path / "class.png"
    common = ["--image", files["image"], "--output", out, "--quiet"]
    code, _, err = run(capsys, "inpaint", "--class-label", 2, "--box", "0,0,4,8", "--model", files["class"], *common)
    assert code == 0, err
    assert Image.open(out).size == (SIZE, SIZE)
    code, _, err = run(capsys, "variation", "--strength", 1, "--model", files["uncond"], *common)
    assert code == 0, err
    code, _, err = run(capsys, "variation", "a cat", "--strength", 0.5, "--model", files["class"], *common)
    assert code == 2 and "class-conditional" in err and "Traceback" not in err


# (command and its flags, a phrase of the error); MODEL is the text model, a FILE name one of ``files``.
# Checked before the model loads: these rows run with a model folder that does not exist.
EARLY_ERRORS = [
    (["inpaint", "p", "--image", "image"], "--mask MASK.png or --box"),
    (["inpaint", "p", "--image", "image", "--mask", "mask", "--box", "0,0,4,4"], "got both"),
    (["inpaint", "p", "--image", "missing.png", "--box", "0,0,4,4"], "no such file"),
    (["inpaint", "p", "--image", "broken", "--box", "0,0,4,4"], "is not a readable image"),
    (["inpaint", "p", "--image", "image", "--mask", "broken"], "--mask"),
    (["inpaint", "p", "--image", "image", "--box", "0,0,4"], "expected 4 integers x0,y0,x1,y1"),
    (["inpaint", "p", "--image", "image", "--box", "a,b,c,d"], "expected 4 integers"),
    (["inpaint", "p", "--image", "image", "--box", "0,0,9,4"], "not inside the 8x8 image"),
    (["inpaint", "p", "--image", "image", "--box", "4,0,4,4"], "not inside"),
    (["inpaint", "p", "--image", "image", "--mask", "empty_mask"], "is empty"),
    (["inpaint", "p", "--image", "image", "--mask", "full_mask"], "vqdiffusion variation"),
    (["inpaint", "p", "--image", "image", "--mask", "big_mask"], "is 16x16 but --image is 8x8"),
    (["variation", "p", "--image", "image", "--strength", "0"], "--strength must be in (0, 1]"),
    (["variation", "p", "--image", "image", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["variation", "p", "--image", "image", "--strength", "nan"], "--strength must be in (0, 1]"),
    (["variation", "p", "--image", "missing.png", "--strength", "0.5"], "no such file"),
    (["outpaint", "p", "--image", "small", "--offset", "3"], "--offset '3': expected 2 integers x,y"),
    (["outpaint", "p", "--image", "small", "--offset", "1.5,2"], "expected 2 integers"),
    (["inpaint", "  ", "--image", "image", "--box", "0,0,4,4"], "the prompt is empty"),
    (["inpaint", "p", "--image", "image", "--box", "0,0,4,4", "--num-images", "0"], "--num-images must be >= 1"),
    (["inpaint", "p", "--image", "image", "--box", "0,0,4,4", "--output", "x.txt"], "unsupported image type"),
]
# Checked once the model is loaded, before sampling.
LATE_ERRORS = [
    (["inpaint", "p", "--image", "big", "--mask", "big_mask"], "is 16x16 but the model makes 8x8 images"),
    (["inpaint", "p", "--image", "big", "--box", "0,0,4,4"], "--resize"),
    (["variation", "p", "--image", "big", "--strength", "0.5"], "is 16x16 but the model makes 8x8 images"),
    (["inpaint", "p", "--image", "image", "--mask", "dotted_mask"], "touches every 2x2-pixel token"),
    (["inpaint", "p", "--image", "big", "--box", "0,0,1,1", "--resize"], "resized to 8x8 is empty"),
    (["outpaint", "p", "--image", "small", "--offset", "8,0"], "does not overlap"),
    (["outpaint", "p", "--image", "image", "--offset", "0,0"], "covers the whole 8x8 canvas"),
    (["outpaint", "p", "--image", "image", "--offset=-7,-7"], "uncovered at --offset -7,-7 touches every"),
    (["inpaint", "--image", "image", "--box", "0,0,4,4"], "this model is text-conditional"),
    (["inpaint", "p", "--image", "image", "--box", "0,0,4,4", "--steps", "1000"], "--steps must be in [1, 100]"),
]


def _argv(files: dict[str, Path], argv: list[str], model: Path) -> list[str]:
    return [str(files.get(a, a)) for a in argv] + ["--model", str(model), "--quiet"]


@pytest.mark.parametrize(("argv", "phrase"), EARLY_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_inputs_before_the_model(files, tmp_path, capsys, argv, phrase) -> None:
    out = tmp_path / "out.png"
    argv = [*argv, "--output", str(out)] if "--output" not in argv else argv
    code, stdout, err = run(capsys, *_argv(files, argv, tmp_path / "no-model"))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and phrase in lines[-1], err
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in err
    assert not out.exists() and not stdout


@pytest.mark.parametrize(("argv", "phrase"), LATE_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_inputs_before_sampling(files, tmp_path, capsys, argv, phrase) -> None:
    out = tmp_path / "out.png"
    code, stdout, err = run(capsys, *_argv(files, [*argv, "--output", str(out)], files["text"]))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and phrase in lines[-1], err
    assert "Traceback" not in err and not out.exists() and not stdout
