"""``vqdiffusion sample-set`` under ``torchrun`` (2 and 3 gloo CPU processes): the same files as one process,
byte for byte, one manifest from rank 0, and a resumed run with another number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.weights import tiny_label_components

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.cli import main
from vqdiffusion.eval.sample_set import image_file, is_complete_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp_sample_set") / "class"
    VQDiffusionPipeline.from_components(tiny_label_components("class")).save_pretrained(path)
    return path


def torchrun(nproc: int, *argv: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc -m vqdiffusion.cli sample-set ...`` on this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "vqdiffusion.cli", "sample-set", "--quiet", *argv]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_process(capsys: pytest.CaptureFixture, *argv: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["sample-set", "--quiet", *argv]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()


def test_processes_write_the_files_of_one_process_and_resume_with_another_count(
    capsys, class_model: Path, tmp_path: Path
) -> None:
    common = ["--model", str(class_model), "--class-labels", "0-3", "--seed", "5", "--batch-size", "2"]
    reference = tmp_path / "one"
    one_process(capsys, *common, "--num-images", "9", "--out", str(reference))
    files = [image_file(i) for i in range(9)]
    assert sorted(p.name for p in reference.glob("*.png")) == files
    assert len({(reference / f).read_bytes() for f in files}) == 9  # every image has its own seed

    shared = tmp_path / "shared"
    done = torchrun(2, *common, "--num-images", "7", "--out", str(shared))
    assert done.stdout.count("\n") == 1 and "(7 written, 0 already there, 2 processes)" in done.stdout  # rank 0 only
    assert sorted(p.name for p in shared.glob("*.png")) == files[:7]
    for name in files[:7]:
        assert (shared / name).read_bytes() == (reference / name).read_bytes(), name
    manifest = json.loads((shared / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["complete"] is True
    assert [(e["index"], e["seed"], e["label"]) for e in manifest["images"]] == [(i, 5 + i, i % 4) for i in range(7)]

    # an empty file, a file cut short and a missing one are sampled again, now by 3 processes, with 2 more images
    (shared / files[2]).write_bytes(b"")
    cut = (shared / files[5]).read_bytes()
    (shared / files[5]).write_bytes(cut[: len(cut) // 2])
    (shared / files[6]).unlink()
    assert not is_complete_image(shared / files[2]) and not is_complete_image(shared / files[5])
    done = torchrun(3, *common, "--num-images", "9", "--out", str(shared))
    assert "(5 written, 4 already there, 3 processes)" in done.stdout
    assert sorted(p.name for p in shared.glob("*.png")) == files
    for name in files:
        assert (shared / name).read_bytes() == (reference / name).read_bytes(), name
    manifest = json.loads((shared / "manifest.json").read_text())
    assert manifest["world_size"] == 3 and manifest["complete"] is True and len(manifest["images"]) == 9
    assert manifest["settings"] == json.loads((reference / "manifest.json").read_text())["settings"]
    assert not list(shared.glob(".*"))  # no temporary file left behind


def test_every_rank_stops_with_rank_0s_error(class_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    torchrun(2, "--model", str(class_model), "--class-labels", "0-3", "--num-images", "2", "--out", str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "vqdiffusion.cli", "sample-set", "--quiet", "--model", str(class_model)]
    command += ["--class-labels", "0-3", "--num-images", "2", "--seed", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert done.stderr.count("error: ") == 2 and "(seed: 0 there, 1 now)" in done.stderr  # both ranks, no hang
