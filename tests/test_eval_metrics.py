"""eval --suite fid / clipscore: the plumbing around torchmetrics and transformers' CLIP, on local random networks.

Two Inception files: a small TorchScript stand-in with the calling convention of ``inception-2015-12-05.pt``
(uint8 images in, resizing inside, ``return_features`` / ``no_output_bias``; that file carries its own
architecture), and our FID Inception-v3 (``vqdiffusion.eval.inception``, the architecture of pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``) with seeded random weights, saved as a state dict and loaded by path.
The CLIP model is a random ``CLIPModel`` saved with the tiny tokenizer.  Every test runs with the network cut
off.
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
from vqdiffusion.eval.folder import ImageBatches, list_images

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


def run_fid(capsys, samples: Path, reference: Path, inception: Path, out: Path, *extra: str, batch: int = 16) -> dict:
    argv = ["eval", "--suite", "fid", "--samples", str(samples), "--reference", str(reference)]
    argv += ["--inception-weights", str(inception), "--batch-size", str(batch), "--out", str(out), "--quiet", *extra]
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


# -- our FID Inception-v3 on a pytorch-fid state dict ------------------------------------------------------

# Names and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 layout without
# AuxLogits, 1008 classes): 94 conv + BatchNorm layers with conv.weight, bn.weight, bn.bias, bn.running_mean and
# bn.running_var each (the file holds no num_batches_tracked), and fc.weight, fc.bias: 94 * 5 + 2 = 472 tensors.
PUBLISHED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision documents 27,161,264 parameters for inception_v3 (AuxLogits, 1000 classes).  AuxLogits holds
# 768*128 + 2*128 (conv0) + 128*768*5*5 + 2*768 (conv1) + 768*1000 + 1000 (fc) = 3,326,696 of them; 1008
# classes add 8 * (2048 + 1) = 16,392.
FID_INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 16_392  # 23,850,960


def random_fid_inception(seed: int):
    """Our FID Inception-v3 with seeded random weights that keep activations of order 1 (He-normal convs) and
    BatchNorm statistics and affine parameters that are far from the identity."""
    from vqdiffusion.eval.inception import FIDInceptionV3

    generator = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=generator) / 2048**0.5)
        model.fc.bias.copy_(torch.randn(1008, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def fid_inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random network's weights saved as the published file is: a flat dict without the BatchNorm counters."""
    state = random_fid_inception(0).state_dict()
    path = tmp_path_factory.mktemp("fid_inception") / "pt_inception-random.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Few images: every one goes through the full 299 x 299 network on the CPU."""
    root = tmp_path_factory.mktemp("fid_images_small")
    return {
        "reference": write_images(root / "reference", 4, seed=0),
        "shifted": write_images(root / "shifted", 4, seed=1, shift=70),
    }


def test_the_fid_inception_has_the_published_layout(fid_inception_file, tmp_path) -> None:
    from vqdiffusion.eval.inception import FIDInceptionV3, load_fid_inception

    state = torch.load(fid_inception_file, weights_only=True)
    assert len(state) == 472 and not any(k.startswith("AuxLogits") for k in state)
    assert {k: tuple(state[k].shape) for k in PUBLISHED_SHAPES} == PUBLISHED_SHAPES
    model = FIDInceptionV3()
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMETERS
    result = model.load_state_dict(state, strict=True)  # the published file lacks only the BatchNorm counters
    assert not result.missing_keys and not result.unexpected_keys
    loaded = load_fid_inception(fid_inception_file)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    full = tmp_path / "full.pth"  # a state_dict() of the module itself, with the counters, loads too
    torch.save(loaded.state_dict(), full)
    assert len(torch.load(full, weights_only=True)) == 472 + 94
    assert torch.equal(load_fid_inception(full).fc.bias, state["fc.bias"])


def test_the_fid_inception_features_follow_pytorch_fid(fid_inception_file, small_folders) -> None:
    network = load_inception(fid_inception_file)
    assert network.backend == "pytorch-fid"
    images = next(iter(ImageBatches(list_images(small_folders["reference"])[:2], 2)))
    features, log_probs = network.features_and_log_probs(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64 and torch.isfinite(features).all()
    assert features.std(dim=0).mean() > 1e-3  # the random network does not collapse the images
    assert torch.equal(network.features(images), features)  # deterministic
    model = network.module
    with torch.no_grad():  # pytorch-fid's protocol written out: [0, 1], bilinear to 299, then 2x - 1
        x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        by_hand = model.pool3(x).double()
        unbiased = (by_hand.float() @ model.fc.weight.t()).double().log_softmax(dim=1)
    assert torch.equal(features, by_hand)
    assert log_probs.shape == (2, 1008) and torch.allclose(log_probs, unbiased, atol=1e-5)


def low_rank_compute_fid(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """torchmetrics' ``_compute_fid`` for covariances of low rank (a few images), exactly: tr sqrt(S1 S2) is
    unchanged when both are restricted to an orthonormal basis holding their ranges (checked).  torchmetrics'
    ``eigvals`` of the 2048 x 2048 product takes about 30 s on two busy cores; the formula itself is checked
    against an independent computation above."""
    probe = torch.randn(sigma1.shape[0], 16, dtype=sigma1.dtype, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(torch.cat([sigma1 @ probe, sigma2 @ probe], dim=1)).Q
    small = [basis.T @ sigma @ basis for sigma in (sigma1, sigma2)]
    for sigma, inner in zip((sigma1, sigma2), small, strict=True):
        assert torch.allclose(basis @ inner @ basis.T, sigma, rtol=0, atol=1e-9 * float(sigma.abs().max()))
    root_trace = torch.linalg.eigvals(small[0] @ small[1]).sqrt().real.sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace


def test_fid_with_the_state_dict_orders_folders(
    capsys, fid_inception_file, small_folders, tmp_path, monkeypatch
) -> None:
    import torchmetrics.image.fid

    monkeypatch.setattr(torchmetrics.image.fid, "_compute_fid", low_rank_compute_fid)
    stats = tmp_path / "reference.npz"
    extra = ("--kid", "--kid-subsets", "2", "--kid-subset-size", "2")
    same = run_fid(
        capsys,
        small_folders["reference"],
        small_folders["reference"],
        fid_inception_file,
        tmp_path / "same",
        "--save-reference-stats",
        str(stats),
        *extra,
        batch=2,
    )
    assert same["inception"]["backend"] == "pytorch-fid" and same["inception"]["feature_dim"] == 2048
    assert "align_corners=False" in same["inception"]["preprocessing"]
    far = run_fid(
        capsys,
        small_folders["shifted"],
        stats,
        fid_inception_file,
        tmp_path / "far",
        *extra,
        "--isc",
        "--isc-splits",
        "2",
        batch=2,
    )
    assert abs(same["metrics"]["fid"]) < 1e-6 * far["metrics"]["fid"]
    assert far["metrics"]["fid"] > 0 and far["metrics"]["kid_mean"] > same["metrics"]["kid_mean"]
    assert 1.0 <= far["metrics"]["isc_mean"] <= 1008 and far["settings"]["isc"]["classes"] == 1008


def test_a_state_dict_that_is_not_the_fid_inception_is_refused(capsys, folders, tmp_path) -> None:
    state = tmp_path / "pt_inception-2015-12-05-stand-in.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match="weights do not match"):
        load_inception(state)
    ok = ["--samples", str(folders["close"]), "--reference", str(folders["reference"])]
    assert "FID Inception-v3 state dict" in bad_fid_input(capsys, [*ok, "--inception-weights", str(state)])
    from vqdiffusion.eval.inception import FIDInceptionV3, fid_inception_from_state_dict

    damaged = FIDInceptionV3().state_dict()
    damaged["Mixed_6c.branch7x7_2.conv.weight"][3, 1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="Mixed_6c.branch7x7_2.conv.weight holds 1 NaN"):
        fid_inception_from_state_dict(damaged, "damaged.pth")


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
