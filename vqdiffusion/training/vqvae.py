"""Training the VQ tokenizer: reconstruction + commitment loss with an EMA codebook (SPEC section 1, part 1).

Objective per image (van den Oord et al. 2017, with the codebook learned by exponential moving averages as
in their appendix and in VQ-VAE-2):

    L = rec(x, x_hat) + beta * ||z - sg(z_q)||^2  [+ w_p * perceptual(x, x_hat)]  [- w_g * D_patch(x_hat)]

with ``x_hat = Dec(z + sg(z_q - z))`` (the straight-through estimator).

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

import argparse
import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ConfigBase, ConfigError, check_positive
from ..data.folders import RESIZE_MODES, ImageFolder
from ..io import load_into, load_weights, save_safetensors
from ..models.vqvae import _PRESETS, VQVAE, Codebook, VQVAEConfig
from .common import (
    LR_SCHEDULES,
    CSVLogger,
    StepBatchSampler,
    autocast_context,
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    load_checkpoint,
    load_optimizer,
    lr_at,
    optimizer_to_tensors,
    prune_checkpoints,
    read_checkpoint_meta,
    resolve_device,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    set_lr,
    take_prefix,
    with_prefix,
)

__all__ = [
    "EMACodebook",
    "PatchDiscriminator",
    "VGGPerceptualLoss",
    "VQVAETrainConfig",
    "VQVAETrainer",
    "add_train_vqvae_parser",
    "export_vqvae",
    "load_vqvae",
    "run_train_vqvae",
    "train_vqvae",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "vqvae"
RECON_LOSSES = ("l1", "mse")
CODEBOOK_INITS = ("data", "random")
VQ_MIXED_PRECISION = ("no", "bf16")
# Fields that may differ between a checkpoint's config and the config resuming it.
RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "save_every",
        "sample_every",
        "log_every",
        "keep_checkpoints",
        "device",
        "num_workers",
        "progress",
        "data_dir",
        "output_dir",
    }
)
_NUM_SAMPLES = 8


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VQVAETrainConfig(ConfigBase):
    """Everything a tokenizer training run depends on (saved in every checkpoint).

    Attributes:
        data_dir: folder of images (searched recursively; captions and class folders are ignored).
        output_dir: where checkpoints, the exported ``vqvae/`` folder, metrics and samples go.
        image_size: training side S (images are resized and centre-cropped, or resized, see ``resize``).
        resize: ``"center_crop"`` or ``"resize"``.
        random_flip: mirror each training image with probability 1/2.
        model_preset: a :meth:`VQVAEConfig.preset` name the next fields override.
        block_out_channels: channels per level (level count = ``len``); when the level count differs from
            the preset's, self-attention is placed at the lowest resolution level only.
        latent_channels, embed_dim, num_embeddings, layers_per_block, norm_num_groups: overrides (None
            keeps the preset's value).
        batch_size, steps: images per step and number of optimizer steps.
        mixed_precision: ``"no"``, ``"bf16"`` (encoder, decoder and losses under bfloat16 autocast; the
            nearest-code search and the EMA codebook stay float32).
        lr, lr_warmup, lr_schedule, lr_decay_steps, min_lr: Adam learning rate, linear warm-up steps,
            ``"constant"`` or ``"cosine"`` (decaying to ``min_lr`` at ``lr_decay_steps``, default ``steps``).
        adam_betas, weight_decay, grad_clip: optimizer settings (``grad_clip`` None = no clipping).
        recon_loss: ``"l1"`` or ``"mse"``.
        commitment_beta: beta of the commitment term.
        codebook_decay, codebook_eps: EMA decay and Laplace-smoothing epsilon of the codebook statistics.
        dead_code_threshold: steps without any assignment after which a code is re-initialised (0 = never).
        codebook_init: ``"data"`` sets the codes to random encoder outputs of the first batch; ``"random"``
            keeps the model's initialisation.
        perceptual_weights: a local VGG16 state dict (torchvision key layout, ``.safetensors``/``.pth``) for
            the perceptual term, or None for none; ``perceptual_weight`` scales it.
        gan_weight, gan_start_step, disc_channels, disc_lr: patch-GAN term (off when ``gan_weight`` is 0),
            its first step, the discriminator width and learning rate (None = ``lr``).
        save_every, sample_every, log_every: intervals in steps (checkpoint + export, sample grid, metrics).
        keep_checkpoints: how many recent checkpoints are kept.
        seed: seeds the model initialisation, batch order, flips and code restarts.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        num_workers: DataLoader worker processes.
        progress: show a tqdm progress bar.
    """

    data_dir: str
    output_dir: str
    image_size: int = 64
    resize: str = "center_crop"
    random_flip: bool = True
    model_preset: str = "tiny"
    block_out_channels: tuple[int, ...] | None = None
    latent_channels: int | None = None
    embed_dim: int | None = None
    num_embeddings: int | None = None
    layers_per_block: int | None = None
    norm_num_groups: int | None = None
    batch_size: int = 16
    steps: int = 10000
    mixed_precision: str = "no"
    lr: float = 2e-4
    lr_warmup: int = 0
    lr_schedule: str = "constant"
    lr_decay_steps: int | None = None
    min_lr: float = 0.0
    adam_betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    recon_loss: str = "l1"
    commitment_beta: float = 0.25
    codebook_decay: float = 0.99
    codebook_eps: float = 1e-5
    dead_code_threshold: int = 100
    codebook_init: str = "data"
    perceptual_weights: str | None = None
    perceptual_weight: float = 1.0
    gan_weight: float = 0.0
    gan_start_step: int = 0
    disc_channels: int = 64
    disc_lr: float | None = None
    save_every: int = 1000
    sample_every: int = 1000
    log_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("data_dir", "output_dir"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ConfigError(f"{name}: {field} must be a non-empty path string, got {getattr(self, field)!r}")
        choices = {
            "resize": RESIZE_MODES,
            "lr_schedule": LR_SCHEDULES,
            "recon_loss": RECON_LOSSES,
            "codebook_init": CODEBOOK_INITS,
            "mixed_precision": VQ_MIXED_PRECISION,
            "model_preset": tuple(sorted(_PRESETS)),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"{name}: {field} must be one of {list(allowed)}, got {getattr(self, field)!r}")
        ints = {
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "disc_channels": self.disc_channels,
            "save_every": self.save_every,
            "sample_every": self.sample_every,
            "log_every": self.log_every,
            "keep_checkpoints": self.keep_checkpoints,
        }
        nonneg = {
            "lr_warmup": self.lr_warmup,
            "dead_code_threshold": self.dead_code_threshold,
            "gan_start_step": self.gan_start_step,
            "num_workers": self.num_workers,
            "seed": self.seed,
        }
        for key, value in {**ints, **nonneg, "lr_decay_steps": self.lr_decay_steps}.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name}: {key} must be an integer, got {value!r}")
        check_positive(name, **ints, lr=self.lr, codebook_eps=self.codebook_eps)
        if self.lr_decay_steps is not None:
            check_positive(name, lr_decay_steps=self.lr_decay_steps)
        floats_nonneg = {
            **nonneg,
            "min_lr": self.min_lr,
            "weight_decay": self.weight_decay,
            "commitment_beta": self.commitment_beta,
            "perceptual_weight": self.perceptual_weight,
            "gan_weight": self.gan_weight,
        }
        for key, value in floats_nonneg.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"{name}: {key} must be a number >= 0, got {value!r}")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ConfigError(f"{name}: codebook_decay must be in (0, 1), got {self.codebook_decay}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"{name}: adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.grad_clip is not None:
            check_positive(name, grad_clip=self.grad_clip)
        if self.disc_lr is not None:
            check_positive(name, disc_lr=self.disc_lr)
        if self.disc_channels % 8:
            raise ConfigError(f"{name}: disc_channels must be a multiple of 8, got {self.disc_channels}")
        for key in ("random_flip", "progress"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{name}: {key} must be true or false, got {getattr(self, key)!r}")
        if self.perceptual_weights is not None and self.image_size < 16:
            raise ConfigError(f"{name}: the perceptual loss needs image_size >= 16, got {self.image_size}")
        self.model_config()  # validates the overrides and image_size against the downsampling factor

    def model_config(self) -> VQVAEConfig:
        """The preset's :class:`VQVAEConfig` with this config's overrides and ``sample_size=image_size``."""
        base = dict(_PRESETS[self.model_preset])
        overrides = {
            "latent_channels": self.latent_channels,
            "embed_dim": self.embed_dim,
            "num_embeddings": self.num_embeddings,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        if self.block_out_channels is not None:
            channels = tuple(self.block_out_channels)
            if len(channels) != len(base["block_out_channels"]):
                attention = (False,) * (len(channels) - 1) + (True,)
                base["encoder_attention"] = base["decoder_attention"] = attention
            base["block_out_channels"] = channels
        base["sample_size"] = self.image_size
        try:
            return VQVAEConfig(**base)
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: invalid model settings: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# EMA codebook
# ---------------------------------------------------------------------------------------------------------


class EMACodebook:
    """Exponential-moving-average statistics that drive a :class:`Codebook`'s ``weight`` (updated in place).

    Per update with encoder outputs ``z [N, D]`` assigned to codes ``tokens [N]``:

        n_k = #{i: tokens_i = k},  s_k = sum_{i: tokens_i = k} z_i
        N_k <- decay * N_k + (1 - decay) * n_k          (cluster_size)
        S_k <- decay * S_k + (1 - decay) * s_k          (embed_sum)
        e_k = S_k / N~_k,  N~_k = (N_k + eps) / (sum_j N_j + K * eps) * sum_j N_j   (Laplace smoothing)

    Smoothing keeps ``N~_k > 0`` for codes that stopped being used while preserving the total count.  The
    statistics start at ``N_k = 1, S_k = e_k`` so the first updates do not blow up unused codes.  A code
    whose last assignment is ``dead_code_threshold`` or more steps old is re-initialised to a random row of
    ``z`` (``N_k = 1, S_k = e_k = z_i``).  The random rows are drawn every update (whether or not a code is
    dead), so updates have no host synchronisation and a fixed generator gives a fixed sequence.

    The codebook's ``weight`` is set to ``requires_grad=False``: exclude it from the optimizer.
    """

    def __init__(self, codebook: Codebook, decay: float = 0.99, eps: float = 1e-5, dead_code_threshold: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMACodebook decay must be in (0, 1), got {decay}")
        if eps <= 0 or dead_code_threshold < 0:
            raise ValueError(f"need eps > 0 and dead_code_threshold >= 0, got {eps}, {dead_code_threshold}")
        self.codebook = codebook
        self.decay, self.eps, self.dead_code_threshold = float(decay), float(eps), int(dead_code_threshold)
        codebook.weight.requires_grad_(False)
        weight = codebook.weight.detach()
        self.cluster_size = torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device)
        self.embed_sum = weight.float().clone()
        self.last_used = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)

    @property
    def num_embeddings(self) -> int:
        return self.cluster_size.shape[0]

    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Set every code to a random row of ``z [N, D]`` (with replacement) and reset the statistics."""
        index = torch.randint(z.shape[0], (self.num_embeddings,), generator=generator, device="cpu")
        codes = z.detach().float()[index.to(z.device)]
        self.embed_sum.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.last_used.zero_()
        self.codebook.weight.copy_(codes)

    @torch.no_grad()
    def update(
        self, z: torch.Tensor, tokens: torch.Tensor, step: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One EMA step with ``z [N, D]`` and their codes ``tokens [N]`` at training step ``step``.

        Returns the ``[K]`` bool mask of codes restarted by this update.
        """
        if z.ndim != 2 or tokens.shape != z.shape[:1]:
            raise ValueError(f"expected z [N, D] and tokens [N], got {tuple(z.shape)} and {tuple(tokens.shape)}")
        k = self.num_embeddings
        z = z.detach().float()
        counts = torch.bincount(tokens, minlength=k).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, tokens, z)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + k * self.eps) * total
        weight = self.embed_sum / smoothed.unsqueeze(1)
        self.last_used = torch.where(counts > 0, torch.full_like(self.last_used, step), self.last_used)
        dead = torch.zeros(k, dtype=torch.bool, device=z.device)
        if self.dead_code_threshold > 0:
            dead = (step - self.last_used) >= self.dead_code_threshold
            index = torch.randint(z.shape[0], (k,), generator=generator, device="cpu").to(z.device)
            fresh = z[index]
            weight = torch.where(dead.unsqueeze(1), fresh, weight)
            self.embed_sum = torch.where(dead.unsqueeze(1), fresh, self.embed_sum)
            self.cluster_size = torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size)
            self.last_used = torch.where(dead, torch.full_like(self.last_used, step), self.last_used)
        self.codebook.weight.copy_(weight)
        return dead

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cluster_size": self.cluster_size, "embed_sum": self.embed_sum, "last_used": self.last_used}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, own in self.state_dict().items():
            if key not in state or state[key].shape != own.shape:
                raise ValueError(f"EMACodebook state: {key} missing or of the wrong shape")
            own.copy_(state[key])


# ---------------------------------------------------------------------------------------------------------
# Optional losses
# ---------------------------------------------------------------------------------------------------------

# torchvision's VGG16 `features`: conv widths, "M" = 2x2 max-pool.  Taps after relu1_2 ... relu5_3.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGPerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG16 features, with uniform layer weights (no learned LPIPS heads).

    ``d(x, y) = sum_l mean_{h,w} || f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)| ||^2`` over relu1_2, relu2_2,
    relu3_3, relu4_3 and relu5_3, the features normalised to unit length over channels.  Images are in
    ``[-1, 1]``, ``[B, 3, H, W]`` with ``H, W >= 16``; returns ``[B]``.

    Args:
        weights: a local file with torchvision's VGG16 state dict (keys ``features.<i>.weight`` /
            ``features.<i>.bias``; ``classifier.*`` keys are ignored), as ``.safetensors`` or as
            ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``).  Nothing is downloaded.
    """

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        state = load_weights(weights)
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        if not features:
            raise ValueError(
                f"{weights}: no 'features.<i>.weight' keys; the perceptual loss accepts torchvision's VGG16 "
                f"state dict (.safetensors, or .pth/.pt/.bin loadable with torch.load(weights_only=True)); "
                f"found keys like {sorted(state)[:3]}"
            )
        features = {k: v for k, v in features.items() if int(k.split(".")[1]) < len(layers)}
        load_into(self, features, f"{weights} (VGG16 features)")
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1.0) / 2.0 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG16_TAPS:
                out.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or min(x.shape[-2:]) < 16:
            raise ValueError(f"perceptual loss needs two [B, 3, H>=16, W>=16] batches, got {tuple(x.shape)}")
        total = x.new_zeros(x.shape[0])
        for fx, fy in zip(self._taps(x), self._taps(y), strict=True):
            total = total + (fx - fy).square().sum(dim=1).mean(dim=(1, 2))
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: ``[B, 3, H, W] -> [B, 1, h, w]`` real/fake logits per patch.

    4x4 convolutions: stride 2 with widths ``channels * (1, 2, 4)`` (GroupNorm after the first), then a
    stride-1 layer to one channel; LeakyReLU(0.2).  Used with the hinge losses of
    :func:`hinge_discriminator_loss`.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers):
            nxt = channels * 2 ** min(i, 3)
            layers += [nn.Conv2d(width, nxt, 4, 2, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            width = nxt
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))`` (scalar)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def export_vqvae(model: VQVAE, directory: str | os.PathLike) -> Path:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` (atomically each); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), directory / "model.safetensors")
    model.config.save_json(directory / "config.json")
    return directory


def load_vqvae(directory: str | os.PathLike) -> VQVAE:
    """Load an exported tokenizer from ``directory`` (holding ``config.json`` + ``model.safetensors``) or from
    a folder with such a ``vqvae/`` subfolder."""
    directory = Path(directory)
    if not (directory / "config.json").is_file() and (directory / "vqvae" / "config.json").is_file():
        directory = directory / "vqvae"
    model = VQVAE(VQVAEConfig.load_json(directory / "config.json"))
    load_into(model, load_weights(directory / "model.safetensors"), str(directory))
    return model


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


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
        self.codebook_ema = EMACodebook(
            self.model.codebook,
            decay=config.codebook_decay,
            eps=config.codebook_eps,
            dead_code_threshold=config.dead_code_threshold,
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
        if self.step == 0 and cfg.codebook_init == "data":
            with torch.no_grad():
                z0 = model.encode_latents(images)
            self.codebook_ema.init_from_data(z0.permute(0, 2, 3, 1).reshape(-1, z0.shape[1]), self.generator)

        lr = self.lr(self.step)
        set_lr(self.optimizer, lr)
        with self.autocast():
            z = model.encode_latents(images).float()
        z_q, tokens = model.quantize(z)  # float32, outside autocast (which would run the distances in bf16)
        dims = (1, 2, 3)
        commit = (z - z_q.detach()).square().mean(dim=dims)
        with self.autocast():
            reconstruction = model.decode_latents(z + (z_q - z).detach())
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

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole training state as ``(tensors, meta)`` for :func:`save_checkpoint`.

        Tensors: ``model.*`` (the VQVAE state dict), ``codebook_ema.{cluster_size,embed_sum,last_used}``,
        ``optimizer.*``, ``disc.*`` and ``disc_optimizer.*`` (with a GAN), ``rng.torch_cpu``,
        ``rng.cuda.<i>``, ``rng.trainer`` (the trainer's generator).  Meta: ``kind``, ``step``, ``config``,
        ``model_config``, ``optimizer``/``disc_optimizer`` structure, ``rng`` (numpy and Python states).
        """
        tensors = with_prefix("model", self.model.state_dict())
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
            "kind": CHECKPOINT_KIND,
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
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{source} is a {meta.get('kind')!r} checkpoint, not a VQ-VAE training checkpoint")
        if VQVAEConfig.from_dict(meta["model_config"]) != self.model.config:
            raise ConfigError(f"{source}: the checkpoint's model config differs from the configured model")
        load_into(self.model, take_prefix("model", tensors), f"{source} (model)")
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
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{path} is a {meta.get('kind')!r} checkpoint, not a VQ-VAE training checkpoint")
        saved = VQVAETrainConfig.from_dict(meta["config"])
        config = saved if config is None else config
        check_resume_config(saved, config, str(path))
        trainer = cls(config, device)
        trainer.load_state_tensors(tensors, meta, str(path))
        return trainer


def check_resume_config(saved: VQVAETrainConfig, new: VQVAETrainConfig, source: str) -> None:
    """Raise ConfigError if ``new`` differs from ``saved`` outside :data:`RESUMABLE_FIELDS`."""
    old_d, new_d = saved.to_dict(), new.to_dict()
    changed = sorted(k for k in old_d if old_d[k] != new_d[k] and k not in RESUMABLE_FIELDS)
    if changed:
        details = ", ".join(f"{k}: {old_d[k]!r} -> {new_d[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {source} with a different training setup ({details}); only "
            f"{sorted(RESUMABLE_FIELDS)} may change"
        )
    if saved.steps != new.steps and new.lr_schedule == "cosine" and new.lr_decay_steps is None:
        logger.warning("steps changed from %d to %d: the cosine schedule is stretched", saved.steps, new.steps)


# ---------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------


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
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.ascontiguousarray(grid)).save(tmp)
    os.replace(tmp, path)


def _window_metrics(sums: dict[str, torch.Tensor], count: int, usage: torch.Tensor, restarts: torch.Tensor) -> dict:
    """Host-side metrics of a logging window (one synchronisation)."""
    values = {k: float(v) / count for k, v in sums.items()}
    probs = usage.double() / usage.sum().clamp_min(1)
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum())
    values["codebook_usage"] = float((usage > 0).double().mean())
    values["perplexity"] = math.exp(entropy)
    values["restarts"] = float(restarts)
    return values


def train_vqvae(config: VQVAETrainConfig, *, resume: bool | str | os.PathLike = False) -> Path:
    """Train a tokenizer as described by ``config``; returns the exported ``output_dir/vqvae`` folder.

    Args:
        config: the run.
        resume: ``False`` starts a fresh run (refusing an ``output_dir`` that already holds checkpoints);
            ``True`` continues from the latest ``output_dir/checkpoints/step_*.safetensors``; a path continues
            from that checkpoint.  A resumed run produces the same parameters as an uninterrupted one (bit
            for bit on CPU) as long as only :data:`RESUMABLE_FIELDS` change.
    """
    out = Path(config.output_dir)
    ckpt_dir = out / "checkpoints"
    device = resolve_device(config.device)
    dataset = ImageFolder(config.data_dir, config.image_size, resize=config.resize)

    if resume:
        path = find_latest_checkpoint(ckpt_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"nothing to resume: no step_*.safetensors checkpoint in {ckpt_dir}")
        trainer = VQVAETrainer.from_checkpoint(path, config, device)
        logger.info("resuming %s at step %d", path, trainer.step)
    else:
        if find_latest_checkpoint(ckpt_dir) is not None:
            raise ValueError(f"{ckpt_dir} already holds checkpoints; resume the run (--resume) or choose another --out")
        trainer = VQVAETrainer(config, device)
    out.mkdir(parents=True, exist_ok=True)
    config.save_json(out / "train_config.json")
    start = trainer.step
    if start >= config.steps:
        logger.warning("the checkpoint is at step %d >= steps=%d; nothing to train", start, config.steps)

    sample_images = torch.stack([dataset[i]["image"] for i in range(min(_NUM_SAMPLES, len(dataset)))])
    sample_images = sample_images.to(device)
    metrics_log = CSVLogger(out / "metrics.csv", resume_step=start if resume else None)
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start, config.steps)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda"
    )
    k = trainer.model.config.num_embeddings
    sums: dict[str, torch.Tensor] = {}
    usage = torch.zeros(k, dtype=torch.long, device=device)
    restarts = torch.zeros((), dtype=torch.long, device=device)
    window = 0
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress, desc="train-vqvae", unit="step")
    try:
        for batch in loader:
            result = trainer.train_step(batch["image"])
            for key in ("loss", "rec", "commit", "psnr"):
                sums[key] = sums.get(key, 0.0) + result[key]
            usage += torch.bincount(result["tokens"].reshape(-1), minlength=k)
            restarts += result["restarted"].sum()
            window += 1
            step = trainer.step
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                values = _window_metrics(sums, window, usage, restarts)
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"the loss became {values['loss']} by step {step}; lower the learning rate"
                    )
                values["lr"] = trainer.lr(step - 1)
                metrics_log.log(step, values)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}",
                    psnr=f"{values['psnr']:.2f}",
                    usage=f"{values['codebook_usage']:.2f}",
                    ppl=f"{values['perplexity']:.1f}",
                )
                sums, window = {}, 0
                usage.zero_()
                restarts.zero_()
            if step % config.sample_every == 0 or step == config.steps:
                _save_samples(trainer.model, sample_images, out / "samples" / f"step_{step:08d}.png")
            if step % config.save_every == 0 or step == config.steps:
                trainer.save(checkpoint_path(ckpt_dir, step))
                prune_checkpoints(ckpt_dir, config.keep_checkpoints)
                export_vqvae(trainer.model, out / "vqvae")
    finally:
        bar.close()
        metrics_log.close()
    if not (out / "vqvae" / "model.safetensors").is_file() or start >= config.steps:
        export_vqvae(trainer.model, out / "vqvae")
    return out / "vqvae"


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

# CLI flag -> (config field, type, help).  Every flag defaults to None ("not given") so that a resumed run
# takes the checkpoint's values and only the flags actually given override them.
_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--image-size": ("image_size", int, "training image side in pixels (default 64)"),
    "--resize": ("resize", str, "center_crop (default) or resize"),
    "--preset": ("model_preset", str, f"model preset: {', '.join(sorted(_PRESETS))} (default tiny)"),
    "--channels": ("block_out_channels", "ints", "channels per level, e.g. 64,128,256 (levels = count)"),
    "--latent-channels": ("latent_channels", int, "encoder output channels"),
    "--embed-dim": ("embed_dim", int, "codebook vector width D"),
    "--codebook-size": ("num_embeddings", int, "codebook size K"),
    "--layers-per-block": ("layers_per_block", int, "residual blocks per encoder level"),
    "--norm-groups": ("norm_num_groups", int, "GroupNorm groups"),
    "--batch-size": ("batch_size", int, "images per step (default 16)"),
    "--steps": ("steps", int, "optimizer steps (default 10000)"),
    "--mixed-precision": ("mixed_precision", str, "no (default) or bf16 autocast"),
    "--lr": ("lr", float, "Adam learning rate (default 2e-4)"),
    "--lr-warmup": ("lr_warmup", int, "linear warm-up steps (default 0)"),
    "--lr-schedule": ("lr_schedule", str, "constant (default) or cosine"),
    "--grad-clip": ("grad_clip", float, "clip the gradient norm to this value"),
    "--recon-loss": ("recon_loss", str, "l1 (default) or mse"),
    "--beta": ("commitment_beta", float, "commitment weight (default 0.25)"),
    "--codebook-decay": ("codebook_decay", float, "EMA decay of the codebook (default 0.99)"),
    "--dead-code-threshold": ("dead_code_threshold", int, "restart codes unused for N steps (0 = off)"),
    "--codebook-init": ("codebook_init", str, "data (default: first batch's encoder outputs) or random"),
    "--perceptual-weights": ("perceptual_weights", str, "local torchvision VGG16 weights (perceptual loss)"),
    "--perceptual-weight": ("perceptual_weight", float, "weight of the perceptual loss (default 1)"),
    "--gan-weight": ("gan_weight", float, "weight of the patch-GAN loss (default 0 = off)"),
    "--gan-start-step": ("gan_start_step", int, "first step of the GAN loss (default 0)"),
    "--save-every": ("save_every", int, "checkpoint + export interval in steps (default 1000)"),
    "--sample-every": ("sample_every", int, "sample grid interval in steps (default 1000)"),
    "--log-every": ("log_every", int, "metrics interval in steps (default 50)"),
    "--keep-checkpoints": ("keep_checkpoints", int, "checkpoints kept (default 2)"),
    "--seed": ("seed", int, "random seed (default 0)"),
    "--device": ("device", str, "auto (default), cpu, cuda, cuda:N"),
    "--num-workers": ("num_workers", int, "data loader processes (default 0)"),
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_train_vqvae_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train-vqvae`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "train-vqvae",
        help="train a VQ-VAE image tokenizer on a folder of images",
        description="Train a VQ-VAE tokenizer; writes checkpoints, metrics and the exported OUT/vqvae.",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--no-flip", action="store_true", default=None, help="no random horizontal flips")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, (field, kind, text) in _FLAGS.items():
        parser.add_argument(flag, dest=field, type=_ints if kind == "ints" else kind, default=None, help=text)
    return parser


def run_train_vqvae(args: argparse.Namespace) -> int:
    """Run ``train-vqvae``.  Bad settings raise ValueError/ConfigError/FileNotFoundError for the CLI."""
    overrides = {field: getattr(args, field) for field, _, _ in _FLAGS.values() if getattr(args, field) is not None}
    if args.no_flip:
        overrides["random_flip"] = False
    overrides["progress"] = not args.quiet
    overrides["data_dir"], overrides["output_dir"] = str(args.data_dir), str(args.out)
    resume_path = None
    if args.resume:
        resume_path = find_latest_checkpoint(Path(args.out) / "checkpoints")
        if resume_path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {Path(args.out) / 'checkpoints'}")
        meta = read_checkpoint_meta(resume_path)
        config = VQVAETrainConfig.from_dict({**meta["config"], **overrides})
    else:
        config = VQVAETrainConfig(**overrides)
    exported = train_vqvae(config, resume=resume_path or False)
    print(exported)
    return 0
