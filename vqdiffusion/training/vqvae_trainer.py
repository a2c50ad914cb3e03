"""Training the VQ tokenizer: reconstruction + commitment loss with an EMA codebook (docs/design.md §1.1).

Objective per image (van den Oord et al. 2017, with the codebook learned by exponential moving averages as
in their appendix and in VQ-VAE-2):

    L = rec(x, x_hat) + beta * ||z - sg(z_q)||^2  [+ w_p * perceptual(x, x_hat)]  [- w_g * D_patch(x_hat)]

with ``x_hat = Dec(z + sg(z_q - z))`` (the straight-through estimator).  With ``quantizer="fsq"``
(docs/design.md §13) ``x_hat = Dec(fsq(z))``, rounding passed straight through, no commitment term and no
codebook statistics.

``rec`` is L1 (default) or MSE on pixels in ``[-1, 1]``.  The codebook gets no gradient: after each
optimizer step :class:`EMACodebook` moves every code to the (Laplace-smoothed) running mean of the encoder
outputs assigned to it, and re-initialises codes unused for ``dead_code_threshold`` steps from random
encoder outputs of the current batch.  The trainer owns these statistics; the model keeps a plain
``codebook.weight`` (frozen for the optimizer), so an exported model loads into :class:`VQVAE` unchanged.

Optional extras, off by default: an LPIPS-style perceptual distance on a user-supplied VGG16 (local
weights only, :class:`VGGPerceptualLoss`) and a small patch discriminator with hinge losses, switched on
at ``gan_start_step`` (:class:`PatchDiscriminator`).

Outputs under ``output_dir``: ``checkpoints/step_XXXXXXXX.safetensors`` (training state, see
:meth:`VQVAETrainer.state_tensors`), ``vqvae/config.json`` + ``vqvae/model.safetensors`` (the exported
tokenizer, the layout of a pipeline's ``vqvae`` folder), ``metrics.csv``, ``samples/step_XXXXXXXX.png``
(originals above reconstructions) and ``train_config.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..io import load_into
from ..models.vqvae import VQVAE, VQVAEConfig
from .checkpoint import (
    VQVAE_CHECKPOINT,
    capture_rng_state,
    check_resume_config,
    load_checkpoint,
    load_optimizer,
    optimizer_to_tensors,
    restore_rng_state,
    save_checkpoint,
    take_prefix,
    with_prefix,
)
from .codebook import EMACodebook
from .codebook_init import l2_normalize
from .losses import PatchDiscriminator, VGGPerceptualLoss, hinge_discriminator_loss
from .lr_schedule import lr_at, set_lr
from .regularizers import pad_background, pad_consistency_loss
from .runtime import autocast_context, seed_everything
from .vqvae_config import RESUMABLE_FIELDS, VQVAETrainConfig

logger = logging.getLogger(__name__)


def _psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[B, C, H, W]`` images in ``[-1, 1]`` (peak 1 on the ``[0, 1]`` scale)."""
    mse = ((reconstruction.detach().float().clamp(-1, 1) - images.float()) / 2).square().mean(dim=(1, 2, 3))
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


class VQVAETrainer:
    """The state of a tokenizer training run and one optimisation step.

    Holds the model, the Adam optimizer (codebook excluded), the :class:`EMACodebook`, the optional
    discriminator and its optimizer, a CPU ``torch.Generator`` for flips and code restarts, and ``step``
    (completed optimizer steps).  :meth:`state_tensors` / :meth:`load_state_tensors` convert all of it, plus
    the global RNG states, to and from a checkpoint.
    """

    def __init__(self, config: VQVAETrainConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        seed_everything(config.seed)
        self.model = VQVAE(config.model_config()).to(self.device)
        self.codebook_ema: EMACodebook | None = None  # FSQ (docs/design.md §13): a fixed grid, nothing to train
        if config.quantizer == "vq":
            self.codebook_ema = EMACodebook(
                self.model.codebook,
                decay=config.codebook_decay,
                eps=config.codebook_eps,
                dead_code_threshold=config.dead_code_threshold,
                l2=config.codebook_l2,
                restart=config.code_restart,
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            params, lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay
        )
        self.perceptual = (
            VGGPerceptualLoss(config.perceptual_weights).to(self.device)
            if config.perceptual_weights is not None
            else None
        )
        self.discriminator: PatchDiscriminator | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        if config.gan_weight > 0:
            self.discriminator = PatchDiscriminator(channels=config.disc_channels).to(self.device)
            self.disc_optimizer = torch.optim.Adam(
                self.discriminator.parameters(),
                lr=config.disc_lr or config.lr,
                betas=tuple(config.adam_betas),
            )
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.codebook_initialised = False  # only consulted at step 0 (see init_codebook)

    def lr(self, step: int) -> float:
        cfg = self.config
        total = cfg.lr_decay_steps or cfg.steps
        return lr_at(step, cfg.lr, cfg.lr_warmup, total, cfg.lr_schedule, cfg.min_lr)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.config.mixed_precision, self.device)

    def train_step(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on ``images [B, 3, S, S]`` in ``[-1, 1]``; returns detached metric tensors
        (``loss``, ``rec``, ``commit``, ``psnr`` as batch means, ``tokens [B, h, w]``, ``restarted [K]``),
        without any host synchronisation."""
        cfg, model = self.config, self.model
        model.train()
        images = images.to(self.device, non_blocking=True)
        if cfg.random_flip:
            flips = (torch.rand(images.shape[0], generator=self.generator) < 0.5).to(self.device)
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        if (
            self.step == 0
            and self.codebook_ema is not None
            and cfg.codebook_init != "random"
            and not self.codebook_initialised
        ):
            self.init_codebook(images)

        lr = self.lr(self.step)
        set_lr(self.optimizer, lr)
        with self.autocast():
            z = model.encode_latents(images).float()
        if cfg.codebook_l2:  # cosine lookup: quantise, commit and pass straight through on the unit latent
            z = l2_normalize(z, dim=1)
        z_q, tokens = model.quantize(z)  # float32, outside autocast (which would run the distances in bf16)
        if self.codebook_ema is None:  # FSQ: no commitment term
            commit = z.new_zeros(z.shape[0])
        else:
            commit = (z - z_q.detach()).square().mean(dim=(1, 2, 3))
        with self.autocast():
            reconstruction = model.decode_latents(model.straight_through(z, z_q))
            diff = (reconstruction.float() - images.float()).flatten(1)
            rec = diff.abs().mean(dim=1) if cfg.recon_loss == "l1" else diff.square().mean(dim=1)
            per_example = rec + cfg.commitment_beta * commit
            if self.perceptual is not None:
                per_example = per_example + cfg.perceptual_weight * self.perceptual(reconstruction, images).float()
            loss = per_example.mean()
            gan_on = self.discriminator is not None and self.step >= cfg.gan_start_step
            if gan_on:
                self.discriminator.requires_grad_(False)
                loss = loss - cfg.gan_weight * self.discriminator(reconstruction).float().mean()
        if cfg.pad_consistency > 0:
            loss = loss + cfg.pad_consistency * self._pad_consistency(images, z).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        self.optimizer.step()

        if gan_on:
            self.discriminator.requires_grad_(True)
            set_lr(self.disc_optimizer, (cfg.disc_lr or cfg.lr) * lr / cfg.lr)
            with self.autocast():
                real_logits = self.discriminator(images).float()
                fake_logits = self.discriminator(reconstruction.detach()).float()
            d_loss = hinge_discriminator_loss(real_logits, fake_logits)
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_optimizer.step()

        if self.codebook_ema is None:
            restarted = torch.zeros(model.config.num_embeddings, dtype=torch.bool, device=self.device)
        else:
            flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            restarted = self.codebook_ema.update(flat_z, tokens.reshape(-1), self.step, self.generator)
        self.step += 1
        return {
            "loss": loss.detach(),
            "rec": rec.detach().mean(),
            "commit": commit.detach().mean(),
            "psnr": _psnr(reconstruction, images).mean(),
            "tokens": tokens,
            "restarted": restarted,
        }

    def _pad_consistency(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Padding-consistency term ``[n]`` of the first ``pad_consistency_images`` images, padded with 1 or
        2 tokens (drawn from the trainer's generator) of black (docs/design.md §1.1)."""
        cfg = self.config
        n = min(cfg.pad_consistency_images, images.shape[0])
        tokens = int(torch.randint(1, 3, (1,), generator=self.generator))
        padded = pad_background(images[:n], tokens * self.model.config.downsample_factor)
        with self.autocast():
            z_padded = self.model.encode_latents(padded).float()
        if cfg.codebook_l2:
            z_padded = l2_normalize(z_padded, dim=1)
        return pad_consistency_loss(z[:n], z_padded, tokens)

    @torch.no_grad()
    def init_codebook(self, images: torch.Tensor, chunk: int = 64) -> None:
        """Initialise the codebook from the encoder outputs of ``images [B, 3, S, S]`` (float32, no
        autocast) as ``codebook_init`` says: random rows (``"data"``) or k-means centres (``"kmeans"``)."""
        cfg = self.config
        if self.codebook_ema is None:
            raise ValueError("an FSQ tokenizer has a fixed grid: there is no codebook to initialise")
        z = torch.cat([self.model.encode_latents(part.to(self.device)) for part in images.split(chunk)])
        if cfg.codebook_l2:
            z = l2_normalize(z, dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if cfg.codebook_init == "kmeans":
            self.codebook_ema.init_kmeans(flat, self.generator, cfg.kmeans_iters)
            logger.info("k-means codebook initialisation from %d latents of %d images", len(flat), len(images))
        else:
            self.codebook_ema.init_from_data(flat, self.generator)
        self.codebook_initialised = True

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole training state as ``(tensors, meta)`` for :func:`save_checkpoint`.

        Tensors: ``model.*`` (the VQVAE state dict), ``codebook_ema.{cluster_size,embed_sum,last_used}`` (VQ),
        ``optimizer.*``, ``disc.*`` and ``disc_optimizer.*`` (with a GAN), ``rng.torch_cpu``,
        ``rng.cuda.<i>``, ``rng.trainer`` (the trainer's generator).  Meta: ``kind``, ``step``, ``config``,
        ``model_config``, ``optimizer``/``disc_optimizer`` structure, ``rng`` (numpy and Python states).
        """
        tensors = with_prefix("model", self.model.state_dict())
        if self.codebook_ema is not None:
            tensors.update(with_prefix("codebook_ema", self.codebook_ema.state_dict()))
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer, "optimizer")
        tensors.update(opt_tensors)
        disc_meta = None
        if self.discriminator is not None:
            tensors.update(with_prefix("disc", self.discriminator.state_dict()))
            disc_tensors, disc_meta = optimizer_to_tensors(self.disc_optimizer, "disc_optimizer")
            tensors.update(disc_tensors)
        rng_tensors, rng_meta = capture_rng_state("rng")
        tensors.update(rng_tensors)
        tensors["rng.trainer"] = self.generator.get_state()
        meta = {
            "kind": VQVAE_CHECKPOINT,
            "step": self.step,
            "config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "optimizer": opt_meta,
            "disc_optimizer": disc_meta,
            "rng": rng_meta,
        }
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
        """Restore everything :meth:`state_tensors` wrote (the trainer must have been built from a
        compatible config; see :func:`check_resume_config`)."""
        if meta.get("kind") != VQVAE_CHECKPOINT:
            raise ValueError(f"{source} is a {meta.get('kind')!r} checkpoint, not a VQ-VAE training checkpoint")
        if VQVAEConfig.from_dict(meta["model_config"]) != self.model.config:
            raise ConfigError(f"{source}: the checkpoint's model config differs from the configured model")
        load_into(self.model, take_prefix("model", tensors), f"{source} (model)")
        if self.codebook_ema is not None:
            self.codebook_ema.load_state_dict(
                {k: v.to(self.device) for k, v in take_prefix("codebook_ema", tensors).items()}
            )
        load_optimizer(self.optimizer, tensors, meta["optimizer"])
        if self.discriminator is not None:
            if meta.get("disc_optimizer") is None:
                raise ConfigError(f"{source} was trained without a discriminator; cannot resume with gan_weight > 0")
            load_into(self.discriminator, take_prefix("disc", tensors), f"{source} (discriminator)")
            load_optimizer(self.disc_optimizer, tensors, meta["disc_optimizer"])
        restore_rng_state(tensors, meta["rng"], "rng")
        self.generator.set_state(tensors["rng.trainer"])
        self.step = int(meta["step"])

    def save(self, path: str | os.PathLike) -> None:
        tensors, meta = self.state_tensors()
        save_checkpoint(path, tensors, meta)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        config: VQVAETrainConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> VQVAETrainer:
        """A trainer restored from ``path``; ``config`` (default: the checkpoint's) may change only
        :data:`RESUMABLE_FIELDS`."""
        tensors, meta = load_checkpoint(path, VQVAE_CHECKPOINT)
        saved = VQVAETrainConfig.from_dict(meta["config"])
        config = saved if config is None else config
        check_resume_config(saved, config, RESUMABLE_FIELDS, str(path))
        trainer = cls(config, device)
        trainer.load_state_tensors(tensors, meta, str(path))
        return trainer
