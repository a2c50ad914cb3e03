"""vqdiffusion sample-set (numbered PNGs + manifest, resumable, one seed per image) and vqdiffusion sheet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.weights import TINY_VQ_CONFIG

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.cli import main
from vqdiffusion.diffusion import MaskReplaceSchedule
from vqdiffusion.eval.sample_set import parse_labels, read_prompts
from vqdiffusion.eval.sheet import contact_sheet
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.models.conditions import CLIPTextCondition, LearnedNullCondition
from vqdiffusion.models.denoiser import Denoiser, DenoiserConfig
from vqdiffusion.models.vqvae import VQVAE
from vqdiffusion.sampling import SamplingOptions

VQ_CONFIG = TINY_VQ_CONFIG
PROMPTS = ["a red cat", "the blue dog", "a green bird on a table"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dirs) -> dict[str, Path]:
    """Tiny random models of the three condition kinds, saved in our layout."""
    root = tmp_path_factory.mktemp("sample_set_models")
    out = {}
    for kind in ("text", "class", "none"):
        torch.manual_seed(0)
        parts = {"vqvae": VQVAE(VQ_CONFIG), "schedule": MaskReplaceSchedule(16, 100)}
        parts["defaults"] = SamplingOptions(num_inference_steps=4, guidance_scale=2.0 if kind != "none" else 1.0)
        if kind == "text":
            text = CLIPTextCondition.from_pretrained(*tiny_clip_dirs, pad_token_id=0)
            parts["denoiser"] = Denoiser(DenoiserConfig.preset("tiny", cond_dim=text.hidden_size))
            parts["text_encoder"] = text
            parts["null_condition"] = LearnedNullCondition(torch.randn(text.max_length, text.hidden_size))
        elif kind == "class":
            parts["denoiser"] = Denoiser(DenoiserConfig.preset("tiny", cond_dim=None, num_class_labels=5))
            parts["null_class_label"] = 4
        else:
            parts["denoiser"] = Denoiser(DenoiserConfig.preset("tiny", cond_dim=None))
        VQDiffusionPipeline.from_components(PipelineComponents(**parts)).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    return path


def sample_set(capsys, *argv: str) -> str:
    assert main(["sample-set", "--quiet", *argv]) == 0
    return capsys.readouterr().out


def test_a_resumed_run_gives_the_images_of_a_fresh_one(capsys, models, prompts_file, tmp_path) -> None:
    common = ["--model", str(models["text"]), "--prompts", str(prompts_file), "--seed", "7"]
    part = tmp_path / "part"
    assert "3 written, 0 already there" in sample_set(
        capsys, *common, "--num-images", "3", "--batch-size", "2", "--out", str(part)
    )
    assert "2 written, 3 already there" in sample_set(
        capsys, *common, "--num-images", "5", "--batch-size", "2", "--out", str(part)
    )
    fresh = tmp_path / "fresh"
    sample_set(capsys, *common, "--num-images", "5", "--batch-size", "16", "--out", str(fresh))
    files = [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in part.glob("*.png")) == files
    for name in files:
        assert (part / name).read_bytes() == (fresh / name).read_bytes(), name
    assert len({(fresh / name).read_bytes() for name in files}) == 5  # the seeds differ
    manifest = json.loads((part / "manifest.json").read_text())
    assert [(e["file"], e["index"], e["seed"], e["prompt"]) for e in manifest["images"]] == [
        (files[i], i, 7 + i, PROMPTS[i % 3]) for i in range(5)
    ]
    settings = manifest["settings"]
    assert settings["sampling"] == SamplingOptions(num_inference_steps=4, guidance_scale=2.0).to_dict()
    assert settings["seed"] == 7 and "seed + i" in settings["seed_rule"] and settings["condition"] == "text"
    assert settings["conditions"]["count"] == 3 and manifest["conditions_source"] == str(prompts_file)
    # all done: nothing is sampled again
    assert "0 written, 5 already there" in sample_set(capsys, *common, "--num-images", "5", "--out", str(part))


def test_class_labels_and_unconditional(capsys, models, tmp_path) -> None:
    out = tmp_path / "classes"
    argv = ["--model", str(models["class"]), "--class-labels", "0-2,3", "--images-per-prompt", "2", "--num-images", "6"]
    sample_set(capsys, *argv, "--out", str(out), "--guidance", "1.5")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["label"] for e in manifest["images"]] == [0, 0, 1, 1, 2, 2]
    assert manifest["settings"]["sampling"]["guidance_scale"] == 1.5
    assert Image.open(out / "000005.png").size == (8, 8)
    plain = tmp_path / "plain"
    sample_set(capsys, "--model", str(models["none"]), "--num-images", "3", "--out", str(plain))
    entries = json.loads((plain / "manifest.json").read_text())["images"]
    assert [sorted(e) for e in entries] == [["file", "index", "seed"]] * 3 and len(list(plain.glob("*.png"))) == 3


def bad(capsys, *argv: str) -> str:
    assert main(["sample-set", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_sample_set_inputs_give_one_line(capsys, models, prompts_file, tmp_path) -> None:
    out = ["--out", str(tmp_path / "out")]
    text, labels = ["--model", str(models["text"])], ["--model", str(models["class"])]
    assert "text model: give captions" in bad(capsys, *text, "--class-labels", "0-3", *out)
    assert "class-conditional: give labels" in bad(capsys, *labels, "--prompts", str(prompts_file), *out)
    assert "not a label of this model (0..3)" in bad(capsys, *labels, "--class-labels", "2-4", *out)
    assert "is not a label or a range" in bad(capsys, *labels, "--class-labels", "3-1", *out)
    assert "unconditional model needs --num-images" in bad(capsys, "--model", str(models["none"]), *out)
    assert "prompts file not found" in bad(capsys, *text, "--prompts", str(tmp_path / "nope.txt"), *out)
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "holds no prompts" in bad(capsys, *text, "--prompts", str(tmp_path / "empty.txt"), *out)
    assert "--num-images must be >= 1" in bad(capsys, *text, "--prompts", str(prompts_file), "--num-images", "0", *out)
    sample_set(capsys, *text, "--prompts", str(prompts_file), "--num-images", "1", *out)
    err = bad(capsys, *text, "--prompts", str(prompts_file), "--num-images", "2", "--steps", "3", *out)
    assert "sampled with other settings (sampling.num_inference_steps: 4 there, 3 now)" in err
    err = bad(capsys, *text, "--prompts", str(prompts_file), "--num-images", "2", "--seed", "1", *out)
    assert "(seed: 0 there, 1 now)" in err


def test_prompt_files_and_labels(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A cat  on a mat.\n"},
            {"image_id": 1, "id": 11, "caption": "A sleeping cat."},
            {"image_id": 2, "id": 12, "caption": "Two dogs."},
        ],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(coco))
    assert read_prompts(path) == ["A cat on a mat.", "A sleeping cat.", "Two dogs."]
    assert read_prompts(path, first_caption_per_image=True) == ["A cat on a mat.", "Two dogs."]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["one", " two "]))
    assert read_prompts(listed) == ["one", "two"]
    listed.write_text(json.dumps({"captions": []}))
    with pytest.raises(ValueError, match="COCO captions"):
        read_prompts(listed)
    assert parse_labels("0-3, 7,9-9") == [0, 1, 2, 3, 7, 9]
    with pytest.raises(ValueError, match="not a label"):
        parse_labels("1,x")


def test_contact_sheet_of_a_sample_set_and_of_a_plain_folder(capsys, models, prompts_file, tmp_path) -> None:
    out = tmp_path / "samples"
    sample_set(capsys, "--model", str(models["text"]), "--prompts", str(prompts_file), "--out", str(out))
    assert main(["sheet", str(out), "--thumb", "32", "--columns", "2"]) == 0
    sheet_path = tmp_path / "samples-sheet.png"
    assert capsys.readouterr().out.strip() == str(sheet_path)
    sheet = Image.open(sheet_path)
    assert sheet.size[0] == 2 * (32 + 8) and sheet.size[1] > 2 * (32 + 8)  # 2 x 2 cells with caption space
    # the captions are drawn: the caption band is not blank, and without captions the cells are image-only
    plain = contact_sheet(out, thumb=32, columns=2, captions=False)
    assert plain.size == (80, 80)
    band = sheet.crop((0, 40, 40, sheet.size[1] // 2)).convert("L")
    assert band.getextrema()[0] < 128
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(loose / "wide.png")
    assert contact_sheet(loose, thumb=40).size[0] == 48  # one cell; the file name is its caption
    assert main(["sheet", str(loose), "--out", str(tmp_path / "sheet.jpg")]) == 2
    assert "is a .png file" in capsys.readouterr().err
