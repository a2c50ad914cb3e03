"""The command line: generate and info on both layouts; bad input gives one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
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


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["generate", "   ", "--model", "{ours}"], "prompt is empty"),
        (["generate", "x", "--model", "{ours}", "--steps", "0"], "--steps"),
        (["generate", "x", "--model", "{ours}", "--steps", "101"], "--steps"),
        (["generate", "x", "--model", "{ours}", "--truncation", "0"], "--truncation"),
        (["generate", "x", "--model", "{ours}", "--truncation", "1.2"], "--truncation"),
        (["generate", "x", "--model", "{ours}", "--num-images", "0"], "--num-images"),
        (["generate", "x", "--model", "{ours}", "--output", "out.txt"], "unsupported image type"),
        (["generate", "x", "--model", "{missing}"], "not found"),
        (["generate", "x", "--model", "{afile}"], "not a model directory"),
        (["info", "{missing}"], "not found"),
        (["generate", "x", "--model", "{ours}", "--prior-weight", "-1"], "--prior-weight"),
        (["generate", "x", "--model", "{ours}", "--prior-weight", "1"], "prior_weight"),
        (["generate", "x", "--model", "{ours}", "--temperature", "0"], "--temperature"),
        (["generate", "x", "--model", "{ours}", "--tokens-per-call", "4"], "tokens_per_call"),
        (["generate", "x", "--model", "{builtin}"], "unknown built-in model"),
    ],
)
def test_bad_input_is_one_line_exit_2(model_dirs: Path, tmp_path: Path, capsys, extra, match: str) -> None:
    (tmp_path / "afile.png").write_bytes(b"\x89PNG")
    paths = {
        "ours": model_dirs / "ours",
        "missing": tmp_path / "nope",
        "afile": tmp_path / "afile.png",
        "builtin": "builtin:nope",
    }
    argv = [a.format(**paths) for a in extra] + (["--quiet"] if extra[0] == "generate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1


def test_corrupt_model_exit_2_without_traceback(model_dirs: Path, tmp_path: Path) -> None:
    VQDiffusionPipeline.from_pretrained(model_dirs / "ours").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "vqvae" / "model.safetensors").write_bytes(b"\x00" * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "vqdiffusion.cli", "generate", "x", "--model", str(tmp_path / "m"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_make_shapes_writes_a_training_folder(tmp_path: Path) -> None:
    from vqdiffusion.data.folders import ImageCaptionFolder
    from vqdiffusion.data.shapes import parse_caption

    assert main(["make-shapes", str(tmp_path / "s"), "--n", "6", "--seed", "3"]) == 0
    folder = ImageCaptionFolder(tmp_path / "s", 64)
    assert len(folder) == 6 and not folder.skipped
    for i in range(6):
        assert parse_caption(folder[i]["caption"]) is not None
    assert main(["make-shapes", str(tmp_path / "t"), "--n", "0"]) == 2
