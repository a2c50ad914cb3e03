"""The configuration of a tokenizer training run (saved in every checkpoint)."""

from __future__ import annotations

import dataclasses
import math

from ..config import ConfigBase, ConfigError, check_choices, check_integers, check_paths, check_positive, is_int
from ..data.folders import RESIZE_MODES
from ..models.vqvae_config import _PRESETS, QUANTIZERS, VQVAEConfig
from .codebook import CODE_RESTARTS, CODEBOOK_INITS
from .lr_schedule import LR_SCHEDULES

RECON_LOSSES = ("l1", "mse")

# Settings of the learned (EMA) codebook, meaningless for FSQ's fixed grid: with quantizer="fsq" each must
# keep its default.  Field -> the train-vqvae flag that sets it (None: no flag).
VQ_ONLY_FIELDS: dict[str, str | None] = {
    "commitment_beta": "--beta",
    "codebook_decay": "--codebook-decay",
    "codebook_eps": None,
    "dead_code_threshold": "--dead-code-threshold",
    "codebook_init": "--codebook-init",
    "kmeans_images": "--kmeans-images",
    "kmeans_iters": "--kmeans-iters",
    "codebook_l2": "--codebook-l2",
    "code_restart": "--code-restart",
}


VQ_MIXED_PRECISION = ("no", "bf16")


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
        latent_channels, embed_dim, num_embeddings, layers_per_block, norm_num_groups, encoder_padding:
            overrides (None keeps the preset's value; see :class:`VQVAEConfig`).
        quantizer, fsq_levels: ``"vq"`` (default: a learned codebook, trained by EMA) or ``"fsq"`` (finite
            scalar quantization over ``fsq_levels``, docs/design.md §13); with ``"fsq"`` ``embed_dim`` and
            ``num_embeddings`` default to ``len(fsq_levels)`` and ``prod(fsq_levels)`` and the codebook settings
            (:data:`VQ_ONLY_FIELDS`) must keep their defaults.
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
            keeps the model's initialisation; ``"kmeans"`` runs k-means (k-means++ seeding,
            ``kmeans_iters`` Lloyd iterations) on the encoder outputs of ``kmeans_images`` training images
            (:func:`~vqdiffusion.training.codebook_init.kmeans`).
        kmeans_images, kmeans_iters: images encoded for the k-means initialisation and its Lloyd iterations.
        codebook_l2: cosine lookup (ViT-VQGAN): the latent is l2-normalised before the nearest-code search,
            the commitment term and the straight-through estimator, and the codes are kept at unit norm, so
            the exported model's Euclidean lookup of the raw latent is the cosine lookup (no format change).
        code_restart: how dead codes are restarted: ``"uniform"`` (random encoder outputs of the batch) or
            ``"distance"`` (outputs drawn with probability proportional to the squared distance from the
            nearest live code, k-means++ style, so restarts do not duplicate live codes;
            :func:`~vqdiffusion.training.codebook_init.distinct_rows`).
        pad_consistency, pad_consistency_images: weight of the padding-consistency term (0 = off;
            :func:`~vqdiffusion.training.regularizers.pad_consistency_loss`: the latents of an image and of the
            same image padded with 1 or 2 tokens of black on every side must agree) and how many images of
            each batch it uses.  For data on a black background.
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
    encoder_padding: str | None = None
    quantizer: str = "vq"
    fsq_levels: tuple[int, ...] = ()
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
    kmeans_images: int = 256
    kmeans_iters: int = 10
    codebook_l2: bool = False
    code_restart: str = "uniform"
    pad_consistency: float = 0.0
    pad_consistency_images: int = 4
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
        check_paths(name, self, "data_dir", "output_dir")
        choices = {
            "resize": RESIZE_MODES,
            "lr_schedule": LR_SCHEDULES,
            "recon_loss": RECON_LOSSES,
            "codebook_init": CODEBOOK_INITS,
            "code_restart": CODE_RESTARTS,
            "mixed_precision": VQ_MIXED_PRECISION,
            "model_preset": tuple(sorted(_PRESETS)),
            "quantizer": QUANTIZERS,
        }
        check_choices(name, self, choices)
        ints = {
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "disc_channels": self.disc_channels,
            "save_every": self.save_every,
            "sample_every": self.sample_every,
            "log_every": self.log_every,
            "keep_checkpoints": self.keep_checkpoints,
            "kmeans_images": self.kmeans_images,
            "pad_consistency_images": self.pad_consistency_images,
        }
        nonneg = {
            "lr_warmup": self.lr_warmup,
            "dead_code_threshold": self.dead_code_threshold,
            "kmeans_iters": self.kmeans_iters,
            "gan_start_step": self.gan_start_step,
            "num_workers": self.num_workers,
            "seed": self.seed,
        }
        check_integers(name, positive=ints, nonneg=nonneg, optional_positive={"lr_decay_steps": self.lr_decay_steps})
        check_positive(name, lr=self.lr, codebook_eps=self.codebook_eps)
        floats_nonneg = {
            "min_lr": self.min_lr,
            "weight_decay": self.weight_decay,
            "commitment_beta": self.commitment_beta,
            "pad_consistency": self.pad_consistency,
            "perceptual_weight": self.perceptual_weight,
            "gan_weight": self.gan_weight,
        }
        for key, value in floats_nonneg.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"{name}: {key} must be a number >= 0, got {value!r}")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"{name}: min_lr={self.min_lr} is above lr={self.lr}, so the learning rate would rise; use "
                "--min-lr <= --lr"
            )
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
        for key in ("random_flip", "progress", "codebook_l2"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{name}: {key} must be true or false, got {getattr(self, key)!r}")
        if self.perceptual_weights is not None and self.image_size < 16:
            raise ConfigError(f"{name}: the perceptual loss needs image_size >= 16, got {self.image_size}")
        self._check_fsq(name)
        self.model_config()  # validates the overrides and image_size against the downsampling factor

    def _check_fsq(self, name: str) -> None:
        """fsq_levels a tuple of integers; with quantizer="fsq" every codebook-only setting at its default."""
        if not isinstance(self.fsq_levels, tuple) or not all(is_int(level) for level in self.fsq_levels):
            raise ConfigError(f"{name}: fsq_levels must be a tuple of integers, got {self.fsq_levels!r}")
        if self.quantizer != "fsq":
            return
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field, flag in VQ_ONLY_FIELDS.items():
            if getattr(self, field) != defaults[field]:
                raise ConfigError(
                    f"{name}: {field}={getattr(self, field)!r}{f' ({flag})' if flag else ''} is a setting of the "
                    "learned VQ codebook; quantizer='fsq' has a fixed grid and no codebook to train: leave it out"
                )

    def model_config(self) -> VQVAEConfig:
        """The preset's :class:`VQVAEConfig` with this config's overrides and ``sample_size=image_size``."""
        base = dict(_PRESETS[self.model_preset])
        overrides = {
            "latent_channels": self.latent_channels,
            "embed_dim": self.embed_dim,
            "num_embeddings": self.num_embeddings,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "encoder_padding": self.encoder_padding,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        if self.block_out_channels is not None:
            channels = tuple(self.block_out_channels)
            if len(channels) != len(base["block_out_channels"]):
                attention = (False,) * (len(channels) - 1) + (True,)
                base["encoder_attention"] = base["decoder_attention"] = attention
            base["block_out_channels"] = channels
        base["sample_size"] = self.image_size
        base["quantizer"], base["fsq_levels"] = self.quantizer, tuple(self.fsq_levels)
        if self.quantizer == "fsq" and self.fsq_levels:
            # the grid fixes the code width and count; an explicit override must agree (checked by VQVAEConfig)
            base["embed_dim"] = len(self.fsq_levels) if self.embed_dim is None else self.embed_dim
            base["num_embeddings"] = math.prod(self.fsq_levels) if self.num_embeddings is None else self.num_embeddings
        try:
            return VQVAEConfig(**base)
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: invalid model settings: {err}") from None
