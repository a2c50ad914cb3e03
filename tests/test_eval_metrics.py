"""eval --suite fid / clipscore: the plumbing around torchmetrics and transformers' CLIP, on local random networks.

The Inception stand-in is a TorchScript module with the calling convention of ``inception-2015-12-05.pt``
(uint8 images in, resizing inside, ``return_features`` / ``no_output_bias``); the real file's architecture
is inside the file, so no architecture code of ours is under test.  The CLIP model is a random
``CLIPModel`` saved with the tiny tokenizer.  Every test runs with the network cut off.
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support.tokenizers import BOS, EOS, tiny_clip_vocab, write_tiny_tokenizer
from torch import Tensor, nn

from vqdiffusion.cli import main
from vqdiffusion.eval.fid import ReferenceStats, compute_fid, folder_features, load_inception

pytest.importorskip("torchmetrics")

FEATURES = 24  # feature width of the stand-in (the real network: 2048)
CLASSES = 10  # its "classes" for IS (the real network: 1008)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


class StandInInception(nn.Module):
    """A small random CNN with the TorchScript Inception's interface."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.conv2 = nn.Conv2d(16, FEATURES, 3, stride=2)
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(
        self, img: Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> Tensor:
        x = F.interpolate(img.to(torch.float32), size=(48, 48), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        features = torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).mean(dim=(2, 3))
        if return_features:
            return features
        logits = features @ self.fc.weight.t()
        if not no_output_bias:
            logits = logits + self.fc.bias
        return torch.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception-stand-in.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script: the format users' files have
        torch.jit.script(StandInInception().eval()).save(str(path))
    return path


def write_images(folder: Path, n: int, seed: int, *, shift: int = 0, size: int = 32) -> Path:
    """``n`` smooth random colour images (upsampled 4 x 4 noise), brightened by ``shift``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 160, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.clip(np.asarray(image, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid_images")
    return {
        "reference": write_images(root / "reference", 64, seed=0),
        "close": write_images(root / "close", 64, seed=1),
        "shifted": write_images(root / "shifted", 64, seed=1, shift=70),
    }


def run_fid(capsys, samples: Path, reference: Path, inception: Path, out: Path, *extra: str) -> dict:
    argv = ["eval", "--suite", "fid", "--samples", str(samples), "--reference", str(reference)]
    argv += ["--inception-weights", str(inception), "--batch-size", "16", "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    assert "FID " in capsys.readouterr().out
    return json.loads((out / "report.json").read_text())


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID from two feature matrices, computed here without torchmetrics: ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b)
    - 2 tr sqrt(S_a^(1/2) S_b S_a^(1/2)), the matrix square roots by symmetric eigendecomposition."""

    def sqrt_psd(m: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(m)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrt_psd(s_a)
    cross = np.trace(sqrt_psd(root @ s_b @ root))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def test_identical_folders_give_zero_and_the_report_has_the_settings(capsys, folders, inception, tmp_path) -> None:
    report = run_fid(capsys, folders["reference"], folders["reference"], inception, tmp_path)
    assert abs(report["metrics"]["fid"]) < 1e-6
    assert report["inception"]["backend"] == "torchscript" and report["inception"]["feature_dim"] == FEATURES
    assert len(report["inception"]["sha256"]) == 64 and "299x299" in report["inception"]["preprocessing"]
    assert report["samples"] == {"path": str(folders["reference"]), "num_images": 64, "image_size": [32, 32]}
    assert report["settings"]["batch_size"] == 16 and report["library"]["metrics"].startswith("torchmetrics")


def test_fid_orders_folders_and_matches_an_independent_computation(capsys, folders, inception, tmp_path) -> None:
    close = run_fid(capsys, folders["close"], folders["reference"], inception, tmp_path / "close")["metrics"]["fid"]
    far = run_fid(capsys, folders["shifted"], folders["reference"], inception, tmp_path / "far")["metrics"]["fid"]
    assert 0 < close < far
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(inception))

    def features(folder: Path) -> np.ndarray:
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return net(batch, return_features=True).double().numpy()

    expected = reference_fid(features(folders["close"]), features(folders["reference"]))
    assert close == pytest.approx(expected, rel=1e-6)


def test_saved_reference_statistics_give_the_same_numbers(capsys, folders, inception, tmp_path) -> None:
    stats = tmp_path / "reference.npz"
    extra = ("--kid", "--kid-subsets", "5", "--kid-subset-size", "32", "--isc", "--isc-splits", "4")
    direct = run_fid(
        capsys,
        folders["close"],
        folders["reference"],
        inception,
        tmp_path / "a",
        "--save-reference-stats",
        str(stats),
        *extra,
    )
    assert direct["reference"]["saved_to"] == str(stats)
    again = run_fid(capsys, folders["close"], stats, inception, tmp_path / "b", *extra)
    for key in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std"):
        assert again["metrics"][key] == pytest.approx(direct["metrics"][key], rel=1e-9, abs=1e-12), key
    assert 1.0 <= direct["metrics"]["isc_mean"] <= CLASSES
    assert again["reference"]["kind"] == "statistics" and again["reference"]["num_images"] == 64
    # a plain (mu, sigma) file, as pytorch-fid and clean-fid write, gives the same FID
    loaded = ReferenceStats.load(stats)
    plain = tmp_path / "plain.npz"
    np.savez(plain, mu=loaded.mu, sigma=loaded.sigma)
    foreign = run_fid(capsys, folders["close"], plain, inception, tmp_path / "c")
    assert foreign["metrics"]["fid"] == pytest.approx(direct["metrics"]["fid"], rel=1e-9)
    assert "another tool" in foreign["reference"]["note"]


def test_statistics_of_another_network_are_refused(capsys, folders, inception, tmp_path) -> None:
    stats = tmp_path / "reference.npz"
    network = load_inception(inception)
    found = folder_features(folders["reference"], network, batch_size=16, progress=False)
    saved = ReferenceStats.from_features(found, network, keep_features=False)
    saved.meta["inception"]["sha256"] = "0" * 64
    saved.save(stats)
    argv = ["eval", "--suite", "fid", "--samples", str(folders["close"]), "--reference", str(stats)]
    assert main([*argv, "--inception-weights", str(inception), "--batch-size", "16", "--quiet"]) == 2
    assert "another Inception file" in capsys.readouterr().err
    assert compute_fid(found.features, ReferenceStats.from_features(found, network, keep_features=False)) < 1e-6


def bad_fid_input(capsys, argv: list[str]) -> str:
    assert main(["eval", "--suite", "fid", "--batch-size", "16", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_fid_inputs_give_one_line(capsys, folders, inception, tmp_path) -> None:
    ok = ["--samples", str(folders["close"]), "--reference", str(folders["reference"])]
    assert "Inception weights file not found" in bad_fid_input(capsys, [*ok, "--inception-weights", "missing.pt"])
    assert "needs --inception-weights" in bad_fid_input(capsys, ok)
    few = write_images(tmp_path / "few", 3, seed=2)
    err = bad_fid_input(capsys, ["--samples", str(few), *ok[2:], "--inception-weights", str(inception)])
    assert "holds 3 images, fewer than the batch size 16" in err
    mixed = write_images(tmp_path / "mixed", 16, seed=3)
    write_images(tmp_path / "mixed_big", 1, seed=3, size=40)
    (tmp_path / "mixed_big" / "000.png").rename(mixed / "zzz.png")
    err = bad_fid_input(capsys, ["--samples", str(mixed), *ok[2:], "--inception-weights", str(inception)])
    assert "zzz.png is 40x40 but the samples folder's first image is 32x32" in err
    corrupt = write_images(tmp_path / "corrupt", 16, seed=4)
    (corrupt / "007.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = bad_fid_input(capsys, ["--samples", str(corrupt), *ok[2:], "--inception-weights", str(inception)])
    assert "cannot read image" in err and "007.png" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a network")
    assert "is neither a TorchScript Inception" in bad_fid_input(capsys, [*ok, "--inception-weights", str(junk)])
    (tmp_path / "empty").mkdir()
    err = bad_fid_input(capsys, ["--samples", str(tmp_path / "empty"), *ok[2:], "--inception-weights", str(inception)])
    assert "holds no images" in err


def test_a_torch_fidelity_state_dict_needs_torch_fidelity(capsys, folders, tmp_path) -> None:
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed")
    state = tmp_path / "pt_inception-2015-12-05-stand-in.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, state)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        load_inception(state)


# -- CLIP score ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIPModel (text and vision towers, 32 x 32 images) with the tiny tokenizer and an image
    processor config, in transformers' layout."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    root = tmp_path_factory.mktemp("tiny_clip_model")
    write_tiny_tokenizer(root)
    vocab, _ = tiny_clip_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    text.update(num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={**text, "pad_token_id": vocab[EOS]}, vision_config={**vision, "patch_size": 8}, projection_dim=16
    )
    model = CLIPModel(config)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(root))
    finally:
        hf_logging.enable_progress_bar()
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (root / "preprocessor_config.json").write_text(json.dumps(processor))
    return root


def test_clip_score_matches_an_independent_computation(capsys, clip_dir, tmp_path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    samples = write_images(tmp_path / "samples", 5, seed=5)
    captions = ["a red cat", "the dog on a table", "a photo of a bird", "blue", "a green dog sitting"]
    lines = [json.dumps({"file": f"{i:03d}.png", "caption": c}) for i, c in enumerate(captions)]
    (samples / "captions.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["eval", "--suite", "clipscore", "--samples", str(samples), "--clip", str(clip_dir), "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "CLIP score" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    # by hand: the images are already 32 x 32, so the processor only rescales and normalises
    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = np.stack([(np.asarray(Image.open(samples / f"{i:03d}.png")) / 255 - mean) / std for i in range(5)])
    with torch.no_grad():
        image = model.visual_projection(
            model.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float()).pooler_output
        )
        ids = tokenizer(captions, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**ids).pooler_output)
    cos = F.cosine_similarity(image.double(), text.double(), dim=-1)
    expected = 2.5 * cos.clamp_min(0)
    assert report["metrics"]["clip_score"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert report["metrics"]["clip_score_100"] == pytest.approx(100 * float(cos.clamp_min(0).mean()), abs=1e-4)
    assert [r["clip_score"] for r in report["per_image"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert report["settings"]["w"] == 2.5 and report["clip"]["text_max_length"] == 77


def test_bad_clip_inputs_give_one_line(capsys, clip_dir, tmp_path) -> None:
    samples = write_images(tmp_path / "samples", 2, seed=6)
    argv = ["eval", "--suite", "clipscore", "--samples", str(samples), "--quiet"]
    assert main([*argv, "--clip", str(tmp_path / "no_clip")]) == 2
    assert "CLIP model folder not found" in capsys.readouterr().err
    assert main([*argv, "--clip", str(clip_dir)]) == 2
    assert "no caption" in capsys.readouterr().err


def test_without_torchmetrics_the_fid_suite_says_which_extra(capsys, folders, inception, monkeypatch) -> None:
    """A missing optional dependency is one line naming the extra, not a traceback."""
    for name in [m for m in sys.modules if m == "torchmetrics" or m.startswith("torchmetrics.")]:
        monkeypatch.delitem(sys.modules, name)

    class NoTorchmetrics:  # an import finder that behaves as if the package were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchmetrics":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(sys, "meta_path", [NoTorchmetrics(), *sys.meta_path])
    ok = ["--samples", str(folders["close"]), "--reference", str(folders["reference"])]
    err = bad_fid_input(capsys, [*ok, "--inception-weights", str(inception)])
    assert "pip install 'vqdiffusion[eval]'" in err
