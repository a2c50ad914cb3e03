"""Tokenizer training driver: :func:`train_vqvae` runs a :class:`~vqdiffusion.training.vqvae_trainer.VQVAETrainer`
over an image folder with the shared loop (:func:`vqdiffusion.training.loop.run_loop`).

Outputs under ``output_dir``: ``checkpoints/step_XXXXXXXX.safetensors`` (training state, see
:meth:`VQVAETrainer.state_tensors`), ``vqvae/config.json`` + ``vqvae/model.safetensors`` (the exported
tokenizer, the layout of a pipeline's ``vqvae`` folder), ``metrics.csv``, ``samples/step_XXXXXXXX.png``
(originals above reconstructions) and ``train_config.json``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..data.folders import ImageFolder
from ..devices import resolve_device
from ..eval.tokenizer import code_perplexity
from ..io import atomic_write_with
from ..models.vqvae import VQVAE, save_vqvae
from .batching import StepBatchSampler
from .loop import LoopSettings, SumWindow, checkpoint_to_resume, run_loop
from .metrics import CSVLogger
from .output_dir import claim_output_dir
from .vqvae_config import VQVAETrainConfig
from .vqvae_trainer import VQVAETrainer

__all__ = ["train_vqvae"]

logger = logging.getLogger(__name__)

_NUM_SAMPLES = 8


def _save_samples(model: VQVAE, images: torch.Tensor, path: Path) -> None:
    """A PNG grid: the images on the top row, their reconstructions below."""
    model.eval()
    with torch.no_grad():
        recon = model.decode_tokens(model.encode(images))
    rows = torch.cat([images.float().cpu(), recon.float().cpu()]).clamp(-1, 1)
    pixels = ((rows + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [2n, S, S, 3]
    n, side = images.shape[0], images.shape[-1]
    grid = pixels.reshape(2, n, side, side, 3).transpose(0, 2, 1, 3, 4).reshape(2 * side, n * side, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, Image.fromarray(np.ascontiguousarray(grid)).save)


class CodebookWindow(SumWindow):
    """Logging window of tokenizer training: the means of :class:`SumWindow` (``loss``, ``rec``, ``commit``,
    ``psnr``, ``samples_per_s``), plus the codebook usage (fraction of the K codes assigned at least once),
    the perplexity exp(H) of the token histogram and the number of dead-code restarts over the window."""

    def __init__(self, num_codes: int, device: torch.device, batch_size: int) -> None:
        self.usage = torch.zeros(num_codes, dtype=torch.long, device=device)
        self.restarts = torch.zeros((), dtype=torch.long, device=device)
        super().__init__(("loss", "rec", "commit", "psnr"), batch_size)

    def add(self, result: dict[str, torch.Tensor]) -> None:
        super().add(result)
        self.usage += torch.bincount(result["tokens"].reshape(-1), minlength=self.usage.shape[0])
        self.restarts += result["restarted"].sum()

    def summary(self) -> dict[str, float]:
        values = super().summary()
        values["codebook_usage"] = float((self.usage > 0).double().mean())
        values["perplexity"] = code_perplexity(self.usage) if bool(self.usage.any()) else float("nan")
        values["restarts"] = float(self.restarts)
        self.usage.zero_()
        self.restarts.zero_()
        return values


def train_vqvae(config: VQVAETrainConfig, *, resume: bool | str | os.PathLike = False) -> Path:
    """Train a tokenizer as described by ``config``; returns the exported ``output_dir/vqvae`` folder.

    Args:
        config: the run.
        resume: ``False`` starts a fresh run (refusing an ``output_dir`` that already holds checkpoints);
            ``True`` continues from the latest ``output_dir/checkpoints/step_*.safetensors``; a path continues
            from that checkpoint.  A resumed run produces the same parameters as an uninterrupted one (bit
            for bit on CPU) as long as only the resumable fields change.

    Only one run may use ``output_dir`` at a time (:func:`~vqdiffusion.training.output_dir.claim_output_dir`).
    """
    with claim_output_dir(config.output_dir):
        return _train(config, resume)


def _train(config: VQVAETrainConfig, resume: bool | str | os.PathLike) -> Path:
    out = Path(config.output_dir)
    ckpt_dir = out / "checkpoints"
    device = resolve_device(config.device)
    dataset = ImageFolder(config.data_dir, config.image_size, resize=config.resize)
    path = checkpoint_to_resume(ckpt_dir, resume)
    if path is not None:
        trainer = VQVAETrainer.from_checkpoint(path, config, device)
        logger.info("resuming %s at step %d", path, trainer.step)
    else:
        trainer = VQVAETrainer(config, device)
    out.mkdir(parents=True, exist_ok=True)
    config.save_json(out / "train_config.json")
    start = trainer.step
    if start == 0 and config.codebook_init == "kmeans":
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed + 2))
        trainer.init_codebook(torch.stack([dataset[int(i)]["image"] for i in order[: config.kmeans_images]]))
    if start >= config.steps:
        logger.warning("the checkpoint is at step %d >= steps=%d; nothing to train", start, config.steps)

    sample_images = torch.stack([dataset[i]["image"] for i in range(min(_NUM_SAMPLES, len(dataset)))])
    sample_images = sample_images.to(device)
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start, config.steps)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda"
    )
    settings = LoopSettings(
        steps=config.steps,
        log_every=config.log_every,
        save_every=config.save_every,
        sample_every=config.sample_every,
        keep_checkpoints=config.keep_checkpoints,
        progress=config.progress,
        desc="train-vqvae",
        postfix=("loss", "psnr", "codebook_usage", "perplexity"),
    )
    metrics_log = CSVLogger(out / "metrics.csv", resume_step=start if path is not None else None)
    try:
        run_loop(
            trainer,
            (batch["image"] for batch in loader),
            settings,
            ckpt_dir,
            CodebookWindow(trainer.model.config.num_embeddings, device, config.batch_size),
            log=metrics_log.log,
            sample=lambda step: _save_samples(trainer.model, sample_images, out / "samples" / f"step_{step:08d}.png"),
            after_save=lambda step: save_vqvae(trainer.model, out / "vqvae"),
        )
    finally:
        metrics_log.close()
    if not (out / "vqvae" / "model.safetensors").is_file() or start >= config.steps:
        save_vqvae(trainer.model, out / "vqvae")
    return out / "vqvae"
