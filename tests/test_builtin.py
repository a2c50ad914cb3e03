"""The built-in model shipped in the package: loads offline, generates, stays small, handles odd prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vqdiffusion
from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.cli import main
from vqdiffusion.data.shapes import COLORS, SHAPES

ASSET = Path(vqdiffusion.__file__).parent / "assets" / "shapes"


@pytest.fixture(scope="module")
def pipe() -> VQDiffusionPipeline:
    return VQDiffusionPipeline.from_pretrained("builtin:shapes")


def test_asset_is_small_and_complete() -> None:
    files = [p for p in ASSET.rglob("*") if p.is_file()]
    # 25 MB today (the 4 x 256 denoiser and text model, the denoiser in half precision): a few MB to spare
    assert sum(p.stat().st_size for p in files) <= 28 * 2**20
    assert (ASSET / "vqdiffusion.json").is_file() and (ASSET / "null_condition.safetensors").is_file()
    assert not [p for p in files if p.suffix in (".pth", ".pt", ".bin", ".ckpt")]  # no pickles


def test_builtin_model_shape_and_defaults(pipe: VQDiffusionPipeline) -> None:
    assert pipe.vqvae.config.sample_size == 64 and pipe.null_condition is not None
    assert pipe.dtype == torch.float32
    pipe.defaults.validate(pipe.schedule.num_timesteps)
    # the vocabulary of the data set is whole-word in the tokenizer
    tokenizer = pipe.text_encoder.tokenizer
    for word in [*COLORS, *SHAPES, "small", "large", "top", "bottom", "left", "right", "center"]:
        assert len(tokenizer.tokenize(word)) == 1, word


def test_short_seeded_generation(pipe: VQDiffusionPipeline) -> None:
    prompts = ["a large red circle in the top left", "a dog riding a bicycle"]  # the second is out of vocabulary
    out = pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]
    again = pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(out.tokens, again.tokens)


def test_cli_uses_the_builtin_model_by_default(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    assert main(["generate", "a small blue square", "--steps", "3", "--output", str(out), "--quiet"]) == 0
    assert out.is_file()
    assert main(["generate", "   ", "--quiet"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
