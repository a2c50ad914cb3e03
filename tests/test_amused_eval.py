"""aMUSEd models through the evaluation path (issue 26): ``sample-set`` from a fake Hub cache with the
micro-condition flags, its manifest, then ``eval --suite fid`` and ``--suite clipscore`` on the folder (the
stand-in Inception and the random CLIP of ``test_eval_metrics``); the flags reach the pipeline as its call
keywords."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from support.amused import SIDE, reference_folder
from support.hub import add_to_hub_cache
from test_eval_metrics import clip_dir, inception, write_images  # noqa: F401 (fixtures)

from vqdiffusion.cli import main
from vqdiffusion.pipeline import VQDiffusionPipeline

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

HUB_ID = "amused/amused-256"
PROMPTS = ["a photo of a cat", "a red bird", "a dog on a table", "blue"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A fake Hub cache holding a tiny random aMUSEd as ``amused/amused-256``, and its pipeline."""
    root = tmp_path_factory.mktemp("amused_eval")
    _, folder = reference_folder(root)
    cache = root / "hub"
    add_to_hub_cache(cache, HUB_ID, folder)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"cache": cache, "prompts": prompts, "pipe": VQDiffusionPipeline.from_pretrained(folder), "root": root}


def _sample_set(hub: dict, out, *flags: str) -> dict:
    argv = ["sample-set", "--quiet", "--model", HUB_ID, "--cache-dir", str(hub["cache"]), "--local-files-only",
            "--prompts", str(hub["prompts"]), "--steps", "3", "--out", str(out), *flags]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_set_fid_and_clipscore(hub, inception, clip_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "set"
    manifest = _sample_set(hub, out, "--aesthetic-score", "4.5", "--crop-coords", "1,2")
    settings = manifest["settings"]
    assert settings["micro_conditions"] == {"aesthetic_score": 4.5, "crop_coords": [1, 2], "orig_size": [8, 8]}
    sampling = settings["sampling"]
    assert (sampling["sampler"], sampling["step_rule"], sampling["num_inference_steps"]) == ("confidence", "amused", 3)
    assert sampling["guidance_scale"] == 10.0  # aMUSEd's default, not VQ-Diffusion's
    assert [e["prompt"] for e in manifest["images"]] == PROMPTS and manifest["complete"]

    # image i is the API call with the same keywords and the generator seeded with seed + i
    pipe = hub["pipe"]
    for i, prompt in enumerate(PROMPTS[:2]):
        want = pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(i), progress=False,
                    aesthetic_score=4.5, crop_coords=(1, 2)).images[0]  # fmt: skip
        assert np.array_equal(_pixels(out / f"{i:06d}.png"), np.asarray(want))

    # resuming with other micro-conditions would mix two distributions
    argv = ["sample-set", "--quiet", "--model", HUB_ID, "--cache-dir", str(hub["cache"]), "--prompts",
            str(hub["prompts"]), "--steps", "3", "--out", str(out), "--aesthetic-score", "6"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    assert "micro_conditions.aesthetic_score: 4.5 there, 6.0 now" in capsys.readouterr().err

    reference = write_images(tmp_path / "reference", 6, seed=0, size=8)
    argv = ["eval", "--suite", "fid", "--samples", str(out), "--reference", str(reference), "--inception-weights",
            str(inception), "--batch-size", "2", "--out", str(tmp_path / "fid"), "--quiet", "--kid",
            "--kid-subsets", "2", "--kid-subset-size", "2"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "fid" / "report.json").read_text())
    assert np.isfinite(report["metrics"]["fid"]) and report["samples"]["num_images"] == len(PROMPTS)
    assert report["settings"]["manifest"]["micro_conditions"]["aesthetic_score"] == 4.5

    argv = ["eval", "--suite", "clipscore", "--samples", str(out), "--clip", str(clip_dir), "--batch-size", "2",
            "--out", str(tmp_path / "clip"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "clip" / "report.json").read_text())
    assert len(report["per_image"]) == len(PROMPTS) and 0 <= report["metrics"]["clip_score"] <= 2.5
    assert report["settings"]["manifest"]["sampling"]["step_rule"] == "amused"


def test_micro_condition_flags_reach_the_pipeline(hub, tmp_path, monkeypatch):
    """generate --aesthetic-score / --crop-coords / --orig-size give the API call's image with the same keywords,
    and another aesthetic score gives other tokens (same seed)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = hub["pipe"]

    def generate(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        argv = ["generate", "a red bird", "--model", HUB_ID, "--cache-dir", str(hub["cache"]), "--steps", "4",
                "--seed", "5", "--quiet", "--output", str(out), *flags]  # fmt: skip
        assert main(argv) == 0
        return _pixels(out)

    def api(**micro) -> torch.Tensor:
        gen = torch.Generator().manual_seed(5)
        return pipe("a red bird", num_inference_steps=4, generator=gen, output_type="tokens", **micro).tokens

    flags = ["--aesthetic-score", "3", "--crop-coords", "2,1", "--orig-size", "512,384"]
    got = generate("low", *flags)
    micro = {"aesthetic_score": 3.0, "crop_coords": (2, 1), "orig_size": (512, 384)}
    want = pipe("a red bird", num_inference_steps=4, generator=torch.Generator().manual_seed(5), progress=False,
                **micro).images[0]  # fmt: skip
    assert np.array_equal(got, np.asarray(want))
    assert np.array_equal(generate("default"), generate("explicit", "--aesthetic-score", "6", "--crop-coords", "0,0"))
    assert not torch.equal(api(**micro), api())
    assert not torch.equal(api(aesthetic_score=3.0), api(aesthetic_score=8.0))


def test_edit_takes_the_micro_condition_flags(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "in.png"
    Image.new("RGB", (2 * SIDE, 2 * SIDE), (200, 30, 30)).save(image)
    out = tmp_path / "var.png"
    argv = ["variation", "a cat", "--model", HUB_ID, "--cache-dir", str(hub["cache"]), "--image", str(image),
            "--strength", "0.5", "--steps", "4", "--seed", "1", "--quiet", "--output", str(out),
            "--aesthetic-score", "5"]  # fmt: skip
    assert main(argv) == 0
    pixels = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    want = hub["pipe"].variation("a cat", pixels, 0.5, num_inference_steps=4, aesthetic_score=5.0,
                                 generator=torch.Generator().manual_seed(1), progress=False).images[0]  # fmt: skip
    assert np.array_equal(_pixels(out), np.asarray(want))
