"""The token folder of vqdiffusion.data.tokens: write_token_folder and TokenDataset without a VQ-VAE."""

from __future__ import annotations

import pytest
import torch

from vqdiffusion.data.tokens import META_FILE, TokenDataset, token_dtype, write_token_folder


def _write(out, kind="classes", count=5, k=7, **extra):
    tokens = torch.randint(0, k, (count, 2, 3), generator=torch.Generator().manual_seed(count))
    records = [{"file": f"{i}.png"} for i in range(count)]
    if kind == "classes":
        for i, record in enumerate(records):
            record["label"] = i % 2
        extra.setdefault("class_names", ["a", "b"])
    if kind == "captions":
        for i, record in enumerate(records):
            record["caption"] = f"caption {i}"
    options = {"image_size": 12, "resize": "resize", "data_dir": out.parent, "vqvae_dir": out.parent / "vq"}
    write_token_folder(out, tokens, records, kind=kind, num_classes=k, vqvae_config={}, **options, **extra)
    return tokens


@pytest.mark.parametrize("kind", ["classes", "captions", "unconditional"])
def test_round_trip(tmp_path, kind):
    tokens = _write(tmp_path / "t", kind, skipped=[(tmp_path / "bad.png", "broken")])
    data = TokenDataset(tmp_path / "t")
    assert data.kind == kind and len(data) == 5 and data.token_shape == (2, 3) and data.num_classes == 7
    assert data.tokens.dtype == torch.int16 and torch.equal(data.tokens.long(), tokens)
    assert data.files == [f"{i}.png" for i in range(5)]
    assert data.meta["skipped"] == [[str(tmp_path / "bad.png"), "broken"]]
    assert data.meta["vqvae_dir"] == str((tmp_path / "vq").resolve())
    if kind == "classes":
        assert data.labels.tolist() == [0, 1, 0, 1, 0] and data.class_names == ["a", "b"] and data[1]["label"] == 1
    if kind == "captions":
        assert data[2]["caption"] == "caption 2"


def test_dtype_and_writer_checks(tmp_path):
    assert token_dtype(32767) == torch.int16 and token_dtype(32768) == torch.int32
    _write(tmp_path / "big", "unconditional", k=40000)
    assert TokenDataset(tmp_path / "big").tokens.dtype == torch.int32
    with pytest.raises(ValueError, match="kind must be one of"):
        _write(tmp_path / "x", "pictures")
    with pytest.raises(ValueError, match="class_names"):
        _write(tmp_path / "x", "classes", class_names=None)
    assert not (tmp_path / "x" / META_FILE).exists()


def test_overwrite_removes_the_old_meta_first(tmp_path, monkeypatch):
    _write(tmp_path / "t", "unconditional")
    assert TokenDataset(tmp_path / "t").meta["count"] == 5

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vqdiffusion.data.tokens.save_safetensors", disk_full)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "t", "unconditional", count=3)
    with pytest.raises(FileNotFoundError, match="not a token folder"):  # the half-overwritten folder is refused
        TokenDataset(tmp_path / "t")
