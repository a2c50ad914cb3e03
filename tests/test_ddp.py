"""DDP training (2 gloo processes on CPU) equals one process with the same global batch; only rank 0 writes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from support.data import make_token_dir

from vqdiffusion.training.checkpoint import load_checkpoint
from vqdiffusion.training.denoiser import train_denoiser
from vqdiffusion.training.denoiser_config import DenoiserTrainConfig

STEPS = 4


def _config(token_dir: Path, out: Path, grad_accum: int) -> DenoiserTrainConfig:
    return DenoiserTrainConfig(
        token_dir=str(token_dir),
        output_dir=str(out),
        text_model="train",
        cond_dim=32,
        text_heads=2,
        text_max_length=16,
        cond_drop_prob=0.25,
        batch_size=8,
        grad_accum=grad_accum,
        steps=STEPS,
        lr=1e-3,
        lr_warmup=0,
        log_every=1,
        save_every=2,
        sample_every=2,
        sample_steps=2,
        num_samples=2,
        device="cpu",
        progress=False,
    )


def _worker(rank: int, world_size: int, port: int, token_dir: str, root: str) -> None:
    """One DDP process; each rank gets its own output folder so that we can see what it writes."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    train_denoiser(_config(Path(token_dir), Path(root) / f"rank{rank}", grad_accum=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    token_dir = make_token_dir(tmp_path / "data")[0]
    # 2 processes x 2 accumulation micro-steps x micro-batch 2 = the global batch of 8
    mp.spawn(_worker, args=(2, _free_port(), str(token_dir), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_denoiser(_config(token_dir, tmp_path / "single", grad_accum=1))
    finally:
        torch.set_num_threads(threads)

    assert not (tmp_path / "rank1").exists()  # rank 1 wrote nothing at all
    rank0 = tmp_path / "rank0"
    assert sorted(p.name for p in rank0.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (rank0 / "checkpoints").iterdir()) == [
        "step_00000002.safetensors",
        "step_00000004.safetensors",
    ]
    assert (rank0 / "model" / "vqdiffusion.json").is_file() and len(list((rank0 / "samples").iterdir())) == 2

    name = f"step_{STEPS:08d}.safetensors"
    ddp, meta = load_checkpoint(rank0 / "checkpoints" / name)
    single, _ = load_checkpoint(tmp_path / "single" / "checkpoints" / name)
    assert meta["world_size"] == 2 and meta["step"] == STEPS
    compared = 0
    for key, value in single.items():
        if key.startswith(("model.", "ema.")):
            torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-5, msg=key)
            compared += 1
    assert compared > 50
    # the importance sampler saw the whole global batch on every rank
    assert torch.equal(ddp["sampler.count"], single["sampler.count"]) and int(single["sampler.count"].sum()) == 32
    torch.testing.assert_close(ddp["sampler.loss_sq"], single["sampler.loss_sq"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("world_size", [3])
def test_global_batch_must_divide(tmp_path, world_size):
    from vqdiffusion.config import ConfigError
    from vqdiffusion.data.tokens import TokenDataset
    from vqdiffusion.training.denoiser_trainer import DenoiserTrainer

    token_dir = make_token_dir(tmp_path)[0]
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        DenoiserTrainer(_config(token_dir, tmp_path / "x", 1), TokenDataset(token_dir), world_size=world_size)
