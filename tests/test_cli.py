"""The command line: generate and info on both layouts (bad input: tests/test_bad_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from support.weights import TinySpec, save_diffusers_pipeline

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.cli import main

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    save_diffusers_pipeline(root / "diffusers", TinySpec(seed=3))
    VQDiffusionPipeline.from_pretrained(root / "diffusers").save_pretrained(root / "ours")
    return root


@pytest.mark.parametrize("layout", ["ours", "diffusers"])
def test_generate_single_image(model_dirs: Path, tmp_path: Path, layout: str, capsys) -> None:
    out = tmp_path / "img.png"
    code = main(
        [
            "generate",
            "a red circle",
            "--model",
            str(model_dirs / layout),
            "--steps",
            "5",
            "--seed",
            "1",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert Image.open(out).size == (8, 8)
    assert str(out) in capsys.readouterr().out


def test_generate_grid_and_numbered_files(model_dirs: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                str(model_dirs / "ours"),
                "--steps",
                "3",
                "--num-images",
                "4",
                "--output",
                str(grid),
                "--quiet",
            ]
        )
        == 0
    )
    assert Image.open(grid).size == (16, 16)
    folder = tmp_path / "many"
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                str(model_dirs / "ours"),
                "--steps",
                "3",
                "--num-images",
                "3",
                "--output",
                str(folder),
                "--quiet",
                "--guidance",
                "1",
                "--truncation",
                "0.9",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png"]


def test_generate_with_the_purity_sampler(model_dirs: Path, tmp_path: Path) -> None:
    out = tmp_path / "purity.png"
    flags = ["--sampler", "purity", "--prior-weight", "1", "--steps", "6", "--spacing", "quadratic"]
    argv = ["generate", "a red circle", "--model", str(model_dirs / "ours"), *flags, "--output", str(out), "--quiet"]
    assert main([*argv, "--tokens-per-call", "3", "--temperature", "0.9"]) == 0
    assert Image.open(out).size == (8, 8)


def test_seed_makes_generation_reproducible(model_dirs: Path, tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, ["5", "5", "6"], strict=True):
        main(
            [
                "generate",
                "a red circle",
                "--model",
                str(model_dirs / "ours"),
                "--steps",
                "4",
                "--seed",
                seed,
                "--output",
                str(path),
                "--quiet",
                "--num-images",
                "4",
            ]
        )
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] and data[0] != data[2]


def test_info(model_dirs: Path, capsys) -> None:
    assert main(["info", str(model_dirs / "ours")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["denoiser"]["num_classes"] == 16
    params = report["parameters"]
    assert params["total"] == sum(v for k, v in params.items() if k != "total") > 0


def test_make_shapes_writes_a_training_folder(tmp_path: Path) -> None:
    from vqdiffusion.data.folders import ImageCaptionFolder
    from vqdiffusion.data.shapes import parse_caption

    assert main(["make-shapes", str(tmp_path / "s"), "--n", "6", "--seed", "3"]) == 0
    folder = ImageCaptionFolder(tmp_path / "s", 64)
    assert len(folder) == 6 and not folder.skipped
    for i in range(6):
        assert parse_caption(folder[i]["caption"]) is not None
    assert main(["make-shapes", str(tmp_path / "t"), "--n", "0"]) == 2
