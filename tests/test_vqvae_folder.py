"""The VQ-VAE folder (config.json + model.safetensors): save_vqvae / load_vqvae of vqdiffusion.models.vqvae."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vqdiffusion.config import ConfigError
from vqdiffusion.io import load_weights
from vqdiffusion.models.vqvae import CONFIG_FILE, VQVAE, WEIGHTS_FILE, VQVAEConfig, load_vqvae, save_vqvae

CONFIG = VQVAEConfig(
    block_out_channels=(8, 8),
    latent_channels=4,
    embed_dim=4,
    num_embeddings=6,
    encoder_attention=(False, False),
    decoder_attention=(False, False),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=8,
)


def _model() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(CONFIG).eval()


def test_round_trip_and_run_folder(tmp_path):
    model = _model()
    assert save_vqvae(model, tmp_path / "run" / "vqvae") == tmp_path / "run" / "vqvae"
    assert sorted(p.name for p in (tmp_path / "run" / "vqvae").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    for folder in (tmp_path / "run" / "vqvae", tmp_path / "run"):  # the folder itself, or one holding vqvae/
        loaded = load_vqvae(folder)
        assert loaded.config == CONFIG
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_weights_dtype(tmp_path):
    save_vqvae(_model(), tmp_path, weights_dtype=torch.float16)
    stored = load_weights(tmp_path / WEIGHTS_FILE)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert next(load_vqvae(tmp_path).parameters()).dtype == torch.float32


def test_missing_and_corrupt_folders_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="VQ-VAE folder not found"):
        load_vqvae(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_vqvae(tmp_path)
    save_vqvae(_model(), tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_vqvae(tmp_path / "a")
    save_vqvae(_model(), tmp_path / "b")
    (tmp_path / "b" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_vqvae(tmp_path / "b")
    save_vqvae(_model(), tmp_path / "c")
    (tmp_path / "c" / CONFIG_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match=r"c/config\.json"):
        load_vqvae(tmp_path / "c")
    (tmp_path / "c" / CONFIG_FILE).write_text('{"num_embeddings": 6, "colour": 1}')
    with pytest.raises(ConfigError, match=r"c/config\.json.*unknown key"):
        load_vqvae(tmp_path / "c")
    save_vqvae(VQVAE(dataclasses.replace(CONFIG, num_embeddings=7)), tmp_path / "d")
    save_vqvae(_model(), tmp_path / "e")
    (tmp_path / "e" / WEIGHTS_FILE).write_bytes((tmp_path / "d" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="codebook"):
        load_vqvae(tmp_path / "e")
