"""``vqdiffusion generate`` / ``info`` with Hub ids (from a local cache, no network), class labels and
unconditional models; a prompt or label given to the wrong kind of model is one ``error:`` line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from support.hub import add_to_hub_cache
from support.weights import TINY_VQ_CONFIG

from vqdiffusion.cli import main
from vqdiffusion.diffusion import MaskReplaceSchedule
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.formats.diffusers import save_diffusers
from vqdiffusion.formats.ours import save_ours
from vqdiffusion.models.conditions import CLIPTextCondition
from vqdiffusion.models.denoiser import Denoiser, DenoiserConfig
from vqdiffusion.models.vqvae import VQVAE
from vqdiffusion.pipeline import VQDiffusionPipeline
from vqdiffusion.sampling import SamplingOptions


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_clip_dirs):
    root = tmp_path_factory.mktemp("cli_models")
    torch.manual_seed(0)
    vqvae, schedule = VQVAE(TINY_VQ_CONFIG), MaskReplaceSchedule.paper_mask_and_replace(16, 100)
    defaults = SamplingOptions(num_inference_steps=3, guidance_scale=2.0)
    text = CLIPTextCondition.from_pretrained(*tiny_clip_dirs, pad_token_id=0)
    save_diffusers(
        PipelineComponents(
            vqvae=vqvae,
            denoiser=Denoiser(DenoiserConfig.preset("tiny", cond_dim=text.hidden_size)),
            schedule=schedule,
            text_encoder=text,
        ),
        root / "text",
    )
    add_to_hub_cache(root / "cache", "acme/tiny", root / "text")
    save_ours(
        PipelineComponents(
            vqvae=vqvae,
            denoiser=Denoiser(DenoiserConfig.preset("tiny", cond_dim=None, num_class_labels=5)),
            schedule=schedule,
            null_class_label=4,
            defaults=defaults,
        ),
        root / "class",
    )
    save_ours(
        PipelineComponents(
            vqvae=vqvae,
            denoiser=Denoiser(DenoiserConfig.preset("tiny", cond_dim=None)),
            schedule=schedule,
            defaults=SamplingOptions(num_inference_steps=3, guidance_scale=1.0),
        ),
        root / "none",
    )
    return root


def _generate(*argv: str) -> int:
    return main(["generate", *argv, "--quiet", "--steps", "3"])


def test_generate_and_info_from_a_hub_id_in_the_cache(models, tmp_path, capsys):
    out = tmp_path / "a.png"
    hub = ["--model", "acme/tiny", "--cache-dir", str(models / "cache"), "--local-files-only"]
    assert _generate("a red cat", *hub, "--output", str(out)) == 0
    assert Image.open(out).size == (8, 8)
    assert main(["info", "acme/tiny", "--cache-dir", str(models / "cache"), "--local-files-only"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["model"] == "acme/tiny" and report["condition"] == "text"


def test_hub_errors_are_one_line(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = _generate("a cat", "--model", "acme/absent", "--cache-dir", str(models / "cache"), "--output", "x.png")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: acme/absent (revision main) is not in the Hugging Face cache")
    local = ["--model", str(models / "text"), "--revision", "fp16"]
    code = _generate("a cat", *local, "--output", str(tmp_path / "y.png"))
    assert code == 2 and "revision apply to Hugging Face Hub ids (org/name) only" in capsys.readouterr().err


def test_class_label(models, tmp_path):
    out = tmp_path / "c.png"
    assert _generate("--model", str(models / "class"), "--class-label", "2", "--seed", "5", "--output", str(out)) == 0
    pipe = VQDiffusionPipeline.from_pretrained(models / "class")
    same = pipe([2], num_inference_steps=3, generator=torch.Generator().manual_seed(5), progress=False).images[0]
    other = pipe([3], num_inference_steps=3, generator=torch.Generator().manual_seed(5), progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(same))
    assert not np.array_equal(np.asarray(same), np.asarray(other))  # the label reaches the model


def test_unconditional_takes_no_prompt(models, tmp_path):
    out = tmp_path / "u"
    assert _generate("--model", str(models / "none"), "--num-images", "2", "--output", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png"]


@pytest.mark.parametrize(
    ("model", "argv", "message"),
    [
        ("class", ["a cat"], "this model is class-conditional: give --class-label N, N in [0, 4), not a prompt"),
        ("class", [], "this model is class-conditional: give --class-label N"),
        ("class", ["--class-label", "4"], "--class-label must be in [0, 4) for this model, got 4"),
        ("none", ["a cat"], "this model is unconditional: it takes no prompt and no --class-label"),
        ("none", ["--class-label", "1"], "this model is unconditional"),
        ("text", [], "this model is text-conditional: give a prompt"),
        ("text", ["--class-label", "1"], "(--class-label is for class-conditional models)"),
        ("text", ["a cat", "--class-label", "1"], "give a prompt (text models) or --class-label"),
        ("text", ["  "], "the prompt is empty"),
    ],
)
def test_condition_errors(models, tmp_path, capsys, model, argv, message):
    code = _generate(*argv, "--model", str(models / model), "--output", str(tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.png").exists()
