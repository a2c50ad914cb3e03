"""Token folders: `tokenize_dataset` equals `VQVAE.encode` on the same images; the reader's checks; the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.data import CAPTIONS, make_caption_folder, make_token_dir
from support.weights import make_vqvae_dir

from vqdiffusion.cli.tokenize import add_tokenize_parser, run_tokenize
from vqdiffusion.data.folders import image_to_tensor, load_image
from vqdiffusion.data.tokens import TokenDataset
from vqdiffusion.io import load_into, load_weights
from vqdiffusion.models.vqvae import VQVAE, VQVAEConfig
from vqdiffusion.training.tokenize import tokenize_dataset


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    tokens, vqvae_dir = make_token_dir(root)
    return root, tokens, vqvae_dir


def test_tokens_equal_vqvae_encode(token_setup):
    root, tokens_dir, vqvae_dir = token_setup
    data = TokenDataset(tokens_dir)
    assert len(data) == 8 and data.kind == "captions" and data.num_classes == 16
    assert data.token_shape == (4, 4) and data.tokens.dtype == torch.int16
    files = sorted((root / "data").glob("*.png"))
    assert data.files == [f.name for f in files]
    images = torch.stack([image_to_tensor(load_image(f, 8)) for f in files])
    model = VQVAE(VQVAEConfig.load_json(vqvae_dir / "config.json"))
    load_into(model, load_weights(vqvae_dir / "model.safetensors"), "vqvae")
    expected = model.eval().encode(images)
    assert torch.equal(data.tokens.long(), expected)
    assert len(torch.unique(expected)) > 3  # the data use several codes
    assert data.captions == [(root / "data" / f"img_{i}.txt").read_text() for i in range(8)]
    item = data[3]
    assert item["tokens"].shape == (16,) and item["tokens"].dtype == torch.long
    assert torch.equal(item["tokens"], expected[3].reshape(-1)) and item["caption"] == CAPTIONS[3]
    meta = json.loads((tokens_dir / "meta.json").read_text())
    assert meta["image_size"] == 8 and meta["vqvae_dir"] == str(vqvae_dir.resolve())
    assert meta["data_dir"] == str((root / "data").resolve()) and meta["skipped"] == []
    with pytest.raises(ValueError, match="already holds"):
        tokenize_dataset(root / "data", vqvae_dir, tokens_dir, image_size=8, device="cpu", progress=False)


def test_classes_unconditional_and_skipped_files(tmp_path):
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")
    for name in ("cats", "dogs"):
        make_caption_folder(tmp_path / "classes" / name, count=3, seed=len(name))
    (tmp_path / "classes" / "dogs" / "broken.png").write_bytes(b"not a png")
    out = tokenize_dataset(
        tmp_path / "classes", vqvae_dir, tmp_path / "cls", kind="classes", image_size=8, device="cpu", progress=False
    )
    data = TokenDataset(out)
    assert data.class_names == ["cats", "dogs"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data[4]["label"] == 1 and "caption" not in data[4]
    assert [Path(p).name for p, _ in data.meta["skipped"]] == ["broken.png"]
    out = tokenize_dataset(
        tmp_path / "classes", vqvae_dir, tmp_path / "unc", kind="unconditional", device="cpu", progress=False
    )
    data = TokenDataset(out)
    assert data.kind == "unconditional" and len(data) == 6 and data.token_shape == (8, 8)  # default size 16


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_reader_errors(token_setup, tmp_path):
    _, tokens_dir, _ = token_setup
    with pytest.raises(FileNotFoundError, match="not found"):
        TokenDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="vqdiffusion tokenize"):
        TokenDataset(tmp_path)

    bad = _copy(tokens_dir, tmp_path / "count")
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "count": 9}))
    with pytest.raises(ValueError, match=r"shape \(8, 4, 4\).*\[9, 4, 4\]"):
        TokenDataset(bad)

    bad = _copy(tokens_dir, tmp_path / "grid")
    (bad / "meta.json").write_text(json.dumps({**meta, "token_shape": [2, 8]}))
    with pytest.raises(ValueError, match="token_shape|shape"):
        TokenDataset(bad)

    bad = _copy(tokens_dir, tmp_path / "range")
    (bad / "meta.json").write_text(json.dumps({**meta, "num_classes": 3}))
    with pytest.raises(ValueError, match="K=3"):
        TokenDataset(bad)

    bad = _copy(tokens_dir, tmp_path / "captions")
    lines = (bad / "captions.jsonl").read_text().splitlines()
    (bad / "captions.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="7 records"):
        TokenDataset(bad)

    bad = _copy(tokens_dir, tmp_path / "corrupt")
    (bad / "tokens.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        TokenDataset(bad)

    bad = _copy(tokens_dir, tmp_path / "keys")
    save_file(
        {"tokens": torch.zeros(8, 4, 4, dtype=torch.int16), "extra": torch.zeros(1)}, str(bad / "tokens.safetensors")
    )
    with pytest.raises(ValueError, match="expected the tensors"):
        TokenDataset(bad)

    bad = _copy(tokens_dir, tmp_path / "json")
    (bad / "meta.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenDataset(bad)
    (bad / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        TokenDataset(bad)


def test_cli(tmp_path, capsys):
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")
    data_dir = make_caption_folder(tmp_path / "data", count=4)
    parser = argparse.ArgumentParser(prog="vqdiffusion")
    add_tokenize_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["tokenize", str(data_dir), "--vqvae", str(vqvae_dir), "--out", str(tmp_path / "t"), "--image-size", "8"]
        + ["--device", "cpu", "--quiet", "--batch-size", "3"]
    )
    assert run_tokenize(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "t")
    assert len(TokenDataset(tmp_path / "t")) == 4
    with pytest.raises(ValueError, match="multiple of"):
        tokenize_dataset(data_dir, vqvae_dir, tmp_path / "u", image_size=7, device="cpu", progress=False)


class _FlakyImages:
    """A folder dataset stand-in: 7 random images, of which index 4 fails to decode."""

    skipped: list = []

    def __init__(self) -> None:
        self.images = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.paths = [Path(f"img_{i}.png") for i in range(7)]

    def __len__(self) -> int:
        return 7

    def load(self, index: int) -> torch.Tensor:
        if index == 4:
            raise OSError("truncated file")
        return self.images[index]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_images_are_stacked_per_batch_and_a_decode_failure_is_skipped(token_setup, num_workers):
    """Batches of 3 with a failure inside the second: the tokens are those of the 6 good images in order, with or
    without loader processes, and the failure is reported with its reason."""
    from vqdiffusion.training.tokenize import _encode_all

    _, _, vqvae_dir = token_setup
    model = VQVAE(VQVAEConfig.load_json(vqvae_dir / "config.json"))
    load_into(model, load_weights(vqvae_dir / "model.safetensors"), "vqvae")
    data = _FlakyImages()
    tokens, kept, skipped = _encode_all(data, model.eval(), torch.device("cpu"), 3, num_workers, progress=False)
    assert kept == [0, 1, 2, 3, 5, 6]
    assert skipped == [("img_4.png", "failed to decode (OSError: truncated file)")]
    assert torch.equal(tokens.long(), model.encode(data.images[kept]))
