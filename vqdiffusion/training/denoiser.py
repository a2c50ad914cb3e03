"""Denoiser training driver: :func:`train_denoiser` runs a
:class:`~vqdiffusion.training.denoiser_trainer.DenoiserTrainer` over a token folder with the shared loop
(:func:`vqdiffusion.training.loop.run_loop`), under ``torchrun`` on every process (see
:mod:`vqdiffusion.training.distributed`), and exports the final EMA weights as a model folder.

Outputs under ``output_dir``: ``checkpoints/step_XXXXXXXX.safetensors`` (see
:meth:`DenoiserTrainer.state_tensors`), ``metrics.csv`` (and TensorBoard events when installed),
``samples/step_XXXXXXXX.png`` (top row: the data's first tokens decoded; bottom row: samples for the same
conditions from the EMA weights, drawn through the pipeline), ``train_config.json`` and, at the end,
``model/`` (an exported pipeline, loadable with ``VQDiffusionPipeline.from_pretrained`` / ``vqdiffusion
generate --model``), for text, class-conditional and unconditional models alike.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..data.tokens import TokenDataset
from ..io import atomic_write_with
from ..models.conditions import ConditionKind
from ..models.vqvae import VQVAE
from .batching import StepBatchSampler
from .checkpoint import checkpoint_path, find_latest_checkpoint
from .denoiser_config import DenoiserTrainConfig
from .denoiser_trainer import DenoiserTrainer, StepBatches
from .distributed import DistributedContext, setup_distributed
from .export import export_pipeline
from .loop import LoopSettings, SumWindow, checkpoint_to_resume, run_loop
from .metrics import CSVLogger
from .output_dir import claim_output_dir

__all__ = ["train_denoiser"]

logger = logging.getLogger(__name__)


def _save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """PNG of image rows, each [n, 3, H, W] in [-1, 1]."""
    pixels = torch.cat(rows).float().cpu().clamp(-1, 1)
    pixels = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [R n, H, W, 3]
    n, side_h, side_w = rows[0].shape[0], pixels.shape[1], pixels.shape[2]
    grid = pixels.reshape(len(rows), n, side_h, side_w, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(len(rows) * side_h, n * side_w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, Image.fromarray(np.ascontiguousarray(grid)).save)


def _check_vqvae_folder(data: TokenDataset, token_dir: str) -> None:
    """The token folder's VQ-VAE must be there before training: the sample grids and the exported model
    need it (checked now rather than after the last step)."""
    folder = data.vqvae_dir
    if folder is None or not Path(folder).is_dir():
        recorded = "records no VQ-VAE folder" if folder is None else f"was made with the VQ-VAE {folder}, which is gone"
        raise FileNotFoundError(
            f"the token folder {token_dir} {recorded}; the trained model needs it: restore that folder or "
            "tokenize the images again with an existing --vqvae"
        )


def _load_sample_vqvae(data: TokenDataset, device: torch.device):
    from ..models.vqvae import load_vqvae

    return load_vqvae(data.vqvae_dir).to(device).eval()


def train_denoiser(config: DenoiserTrainConfig, *, resume: bool | str | os.PathLike = False) -> Path:
    """Train a denoiser as described by ``config``; returns the exported model folder ``output_dir/model``.

    Args:
        config: the run.
        resume: ``False`` starts a fresh run (refusing an ``output_dir`` that already holds checkpoints);
            ``True`` continues from the latest ``output_dir/checkpoints/step_*.safetensors``; a path continues
            from that checkpoint.  A resumed run reaches the same parameters as an uninterrupted one (bit for
            bit on CPU) as long as only the resumable fields change.

    Under ``torchrun`` every process calls this (see :mod:`vqdiffusion.training.denoiser_trainer`).
    """
    world, device = setup_distributed(config.device)
    try:
        with claim_output_dir(config.output_dir, enabled=world.main):  # one run per output folder
            return _train(config, resume, world, device)
    finally:
        world.close()


def _train(
    config: DenoiserTrainConfig, resume: bool | str | os.PathLike, world: DistributedContext, device: torch.device
) -> Path:
    out = Path(config.output_dir)
    ckpt_dir = out / "checkpoints"
    data = TokenDataset(config.token_dir)
    _check_vqvae_folder(data, config.token_dir)
    path = checkpoint_to_resume(ckpt_dir, resume)
    if path is not None:
        trainer = DenoiserTrainer.from_checkpoint(
            path, config, data, device, rank=world.rank, world_size=world.world_size
        )
        if world.main:
            logger.info("resuming %s at step %d", path, trainer.step)
    else:
        trainer = DenoiserTrainer(config, data, device, rank=world.rank, world_size=world.world_size)
    start = trainer.step
    if start >= config.steps and world.main:
        logger.warning("the checkpoint is at step %d >= steps=%d; nothing to train", start, config.steps)

    metrics_log, sample = None, None
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        config.save_json(out / "train_config.json")
        has_tensorboard = importlib.util.find_spec("tensorboard") is not None  # else CSV only, silently
        metrics_log = CSVLogger(
            out / "metrics.csv",
            resume_step=start if path is not None else None,
            tensorboard_dir=out / "tensorboard" if has_tensorboard else None,
        )
        vqvae = _load_sample_vqvae(data, device)
        if vqvae is not None:
            sample = lambda step: _save_samples(trainer, vqvae, out / "samples" / f"step_{step:08d}.png")  # noqa: E731
    order = StepBatchSampler(len(data), config.batch_size, config.seed, start, config.steps)
    loader = DataLoader(
        StepBatches(data, order, trainer.rank_rows(), trainer.caption_ids),
        batch_size=None,
        sampler=range(start, config.steps),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    keys = ("loss", "vb", "aux") + (("grad_norm",) if config.grad_clip is not None else ())
    settings = LoopSettings(
        steps=config.steps,
        log_every=config.log_every,
        save_every=config.save_every,
        sample_every=config.sample_every,
        keep_checkpoints=config.keep_checkpoints,
        progress=config.progress,
        desc="train",
        postfix=("loss", "lr", "samples_per_s"),
        time_limit=config.time_limit,
    )
    try:
        last_saved = run_loop(
            trainer,
            loader,
            settings,
            ckpt_dir,
            SumWindow(keys, config.batch_size),
            log=metrics_log.log if metrics_log is not None else lambda step, values: None,
            sample=sample,
            is_main=world.main,
            barrier=world.barrier,
            agree=world.broadcast,
        )
    finally:
        if metrics_log is not None:
            metrics_log.close()

    if world.main:
        if last_saved is None:  # nothing trained in this call: export the checkpoint we resumed from
            last_saved = find_latest_checkpoint(ckpt_dir)
            if last_saved is None:
                last_saved = checkpoint_path(ckpt_dir, trainer.step)
                trainer.save(last_saved)
        export_pipeline(last_saved, out / "model", overwrite=True)  # the run's own model folder
    world.barrier()
    return out / "model"


def _save_samples(trainer: DenoiserTrainer, vqvae: VQVAE, path: Path) -> None:
    """Sample grid: the first ``num_samples`` items' own tokens decoded above samples for their conditions,
    drawn through the pipeline of the EMA weights (``sample_steps`` steps, the trained guidance)."""
    config, data = trainer.config, trainer.data
    indices = list(range(min(config.num_samples, len(data))))
    pipe = trainer.pipeline(vqvae)
    if trainer.kind == ConditionKind.TEXT:
        prompts, per_prompt = [data.captions[i] for i in indices], 1
    elif trainer.kind == ConditionKind.CLASS:
        prompts, per_prompt = [int(data.labels[i]) for i in indices], 1
    else:
        prompts, per_prompt = None, len(indices)
    generator = torch.Generator(device=trainer.device).manual_seed(config.seed)
    samples = pipe(
        prompts,
        num_inference_steps=min(config.sample_steps, trainer.schedule.num_timesteps),
        num_images_per_prompt=per_prompt,
        generator=generator,
        output_type="pt",
        progress=False,
    ).images
    real = data.tokens[indices].long().to(trainer.device)
    with torch.no_grad():
        rows = [vqvae.decode_tokens(real), samples.to(trainer.device) * 2 - 1]
    _save_grid(rows, path)
