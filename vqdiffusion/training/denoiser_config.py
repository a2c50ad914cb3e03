"""The configuration of a denoiser training run (saved in every checkpoint)."""

from __future__ import annotations

import dataclasses

from ..config import ConfigBase, ConfigError, check_choices, check_integers, check_paths, check_positive, is_number
from ..diffusion import MaskReplaceSchedule
from ..models.denoiser import ACTIVATIONS, DENOISER_PRESETS, DenoiserConfig
from ..objectives import is_mask_only
from .lr_schedule import LR_SCHEDULES
from .runtime import MIXED_PRECISION

NOISE_SCHEDULES = ("reference", "mask_and_replace")


TEXT_MODELS = ("pretrained", "train")

# The training objectives (docs/design.md §5.3; vqdiffusion.objectives).
OBJECTIVES = ("vlb", "masked_ce", "elbo")


RESUMABLE_FIELDS = frozenset(
    {
        "token_dir",
        "output_dir",
        "text_encoder_dir",
        "tokenizer_dir",
        "steps",
        "grad_accum",
        "log_every",
        "save_every",
        "sample_every",
        "sample_steps",
        "num_samples",
        "keep_checkpoints",
        "device",
        "num_workers",
        "progress",
        "time_limit",
    }
)


@dataclasses.dataclass(frozen=True)
class DenoiserTrainConfig(ConfigBase):
    """Everything a denoiser training run depends on (saved in every checkpoint).

    Attributes:
        token_dir: a token folder from ``vqdiffusion tokenize`` (fixes K, the token grid and the condition kind).
        output_dir: where checkpoints, metrics, samples and the exported ``model/`` go.
        preset: a :data:`DENOISER_PRESETS` name; ``num_layers``, ``dim``, ``num_heads``, ``cond_dim``,
            ``mlp_ratio``, ``activation`` override it (None keeps the preset's value).  ``num_classes``,
            ``height``, ``width`` come from the token folder and ``num_timesteps`` from the schedule.
        noise_schedule: ``"reference"`` (the authors' and diffusers' cumulative endpoints, in effect mask
            only) or ``"mask_and_replace"`` (the paper's: gbar_T = 0.9, K bbar_T = 0.1); ``alpha_cum_start``,
            ``alpha_cum_end``, ``gamma_cum_start``, ``gamma_cum_end`` override single endpoints.
        num_timesteps: T.
        objective: ``"vlb"`` (VQ-Diffusion's bound: KL terms + the auxiliary x0 loss, importance-sampled
            steps), ``"masked_ce"`` (MaskGIT / MUSE: cross-entropy of x0 at the corrupted positions,
            uniform steps) or ``"elbo"`` (MD4 / MDLM: that cross-entropy at [MASK] positions weighted by the
            probability of unmasking at the step, uniform steps; needs a mask-only schedule).
        init_from: start from this exported model's weights (a folder, ``builtin:NAME`` or a Hub id;
            :func:`vqdiffusion.training.init_from.init_from_model`) with a fresh optimizer, warm-up and EMA;
            None starts from a random initialisation.
        aux_weight, adaptive_aux, mask_weight: :func:`diffusion_loss` settings (lambda of the auxiliary
            x0 cross-entropy, its (1 - t/T) + 1 scaling, weights of [MASK] / other positions).
        text_model: ``"pretrained"`` (a frozen local CLIP from ``text_encoder_dir`` + ``tokenizer_dir``,
            prompts padded with ``text_pad_token_id`` after end-of-text, None = the tokenizer's padding) or
            ``"train"`` (a CLIP-architecture text transformer of width ``cond_dim`` with ``text_layers``
            layers, ``text_heads`` heads and ``text_max_length`` positions, and the character tokenizer,
            trained with the denoiser).  Only used for caption data.
        text_words: with ``text_model="train"``, words that the tokenizer keeps whole (one token each;
            other words fall back to characters); ``()`` is the plain character tokenizer.  ``vqdiffusion
            train --text-vocab words`` fills it with the training captions' words.
        cond_drop_prob: fraction of samples whose condition is replaced by the learned null condition (0 =
            no null condition, no classifier-free guidance).
        batch_size: the global batch of one optimizer step (all processes and accumulation micro-steps).
        grad_accum: micro-steps per optimizer step.
        lr, lr_warmup, lr_schedule, lr_decay_steps, min_lr: AdamW learning rate, linear warm-up steps,
            ``"constant"`` or ``"cosine"`` (to ``min_lr`` at ``lr_decay_steps``, default ``steps``).
        adam_betas, weight_decay: AdamW settings (no decay on biases, norms, embeddings, the null).
        grad_clip: maximum global gradient norm (None = no clipping).
        ema_decay: decay of the parameter EMA (the exported weights).
        mixed_precision: ``"no"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + GradScaler, CUDA only).
        steps: optimizer steps.
        log_every, save_every, sample_every: intervals in steps (metrics row, checkpoint, sample grid).
        sample_steps, num_samples: sampling steps and images of a sample grid.
        keep_checkpoints: how many recent checkpoints are kept.
        seed: seeds the initialisation, the batch order and every per-step draw.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... (under torchrun with CUDA: ``cuda:LOCAL_RANK``).
        num_workers: DataLoader processes preparing batches (caption tokenization).
        progress: show a tqdm progress bar.
        time_limit: seconds of training after which this call stops early (checked at every metrics row): it
            logs, saves a checkpoint and exports as at the last step; ``--resume`` continues the schedule.
    """

    token_dir: str
    output_dir: str
    preset: str = "tiny"
    num_layers: int | None = None
    dim: int | None = None
    num_heads: int | None = None
    cond_dim: int | None = None
    mlp_ratio: float | None = None
    activation: str | None = None
    noise_schedule: str = "reference"
    num_timesteps: int = 100
    alpha_cum_start: float | None = None
    alpha_cum_end: float | None = None
    gamma_cum_start: float | None = None
    gamma_cum_end: float | None = None
    objective: str = "vlb"
    init_from: str | None = None
    aux_weight: float = 5e-4
    adaptive_aux: bool = True
    mask_weight: tuple[float, float] = (1.0, 1.0)
    text_model: str = "pretrained"
    text_encoder_dir: str | None = None
    tokenizer_dir: str | None = None
    text_pad_token_id: int | None = None
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 77
    text_words: tuple[str, ...] = ()
    cond_drop_prob: float = 0.1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    lr_warmup: int = 500
    lr_schedule: str = "constant"
    lr_decay_steps: int | None = None
    min_lr: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 4.5e-2
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    steps: int = 10000
    log_every: int = 50
    save_every: int = 1000
    sample_every: int = 1000
    sample_steps: int = 25
    num_samples: int = 8
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    time_limit: float | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_paths(name, self, "token_dir", "output_dir")
        choices = {
            "preset": tuple(sorted(DENOISER_PRESETS)),
            "noise_schedule": NOISE_SCHEDULES,
            "text_model": TEXT_MODELS,
            "lr_schedule": LR_SCHEDULES,
            "mixed_precision": MIXED_PRECISION,
            "objective": OBJECTIVES,
        }
        check_choices(name, self, choices)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"{name}: activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        positive = {
            "num_timesteps": self.num_timesteps,
            "text_layers": self.text_layers,
            "text_heads": self.text_heads,
            "text_max_length": self.text_max_length,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "steps": self.steps,
            "log_every": self.log_every,
            "save_every": self.save_every,
            "sample_every": self.sample_every,
            "sample_steps": self.sample_steps,
            "num_samples": self.num_samples,
            "keep_checkpoints": self.keep_checkpoints,
        }
        nonneg = {"lr_warmup": self.lr_warmup, "seed": self.seed, "num_workers": self.num_workers}
        optional_positive = {
            "num_layers": self.num_layers,
            "dim": self.dim,
            "num_heads": self.num_heads,
            "cond_dim": self.cond_dim,
            "lr_decay_steps": self.lr_decay_steps,
        }
        check_integers(
            name,
            positive=positive,
            nonneg=nonneg,
            optional_positive=optional_positive,
            optional={"text_pad_token_id": self.text_pad_token_id},  # any integer (a token id) or None
        )
        check_positive(name, lr=self.lr)
        for key, value in {"min_lr": self.min_lr, "weight_decay": self.weight_decay}.items():
            if not is_number(value) or not value >= 0:
                raise ConfigError(f"{name}: {key} must be a number >= 0, got {value!r}")
        if not is_number(self.aux_weight) or not self.aux_weight >= 0:
            raise ConfigError(f"{name}: aux_weight must be a number >= 0, got {self.aux_weight!r}")
        if len(self.mask_weight) != 2 or not all(is_number(w) and w >= 0 for w in self.mask_weight):
            raise ConfigError(f"{name}: mask_weight must be two numbers >= 0 ([MASK], other), got {self.mask_weight}")
        if not is_number(self.cond_drop_prob) or not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"{name}: cond_drop_prob must be in [0, 1), got {self.cond_drop_prob!r}")
        if not is_number(self.ema_decay) or not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{name}: ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if len(self.adam_betas) != 2 or not all(is_number(b) and 0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"{name}: adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.grad_clip is not None:
            check_positive(name, grad_clip=self.grad_clip)
        if self.mlp_ratio is not None:
            check_positive(name, mlp_ratio=self.mlp_ratio)
        if self.time_limit is not None and (not is_number(self.time_limit) or not self.time_limit > 0):
            raise ConfigError(f"{name}: time_limit must be a number of seconds > 0, got {self.time_limit!r}")
        for key in ("adaptive_aux", "progress"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{name}: {key} must be true or false, got {getattr(self, key)!r}")
        dirs = (self.text_encoder_dir, self.tokenizer_dir)
        if self.text_model == "pretrained" and (dirs[0] is None) != (dirs[1] is None):
            raise ConfigError(f"{name}: give both text_encoder_dir and tokenizer_dir (got {dirs}), or neither")
        if self.text_model == "train" and any(d is not None for d in dirs):
            raise ConfigError(
                f"{name}: text_model='train' builds its own text model; drop text_encoder_dir and tokenizer_dir"
            )
        if self.text_words and self.text_model != "train":
            raise ConfigError(f"{name}: text_words is only for text_model='train' (a pretrained CLIP has its own)")
        if not all(isinstance(w, str) and w for w in self.text_words):
            raise ConfigError(f"{name}: text_words must be non-empty strings, got {list(self.text_words)[:5]}...")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{name}: batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ConfigError(
                f"{name}: init_from must be a model folder, builtin:NAME or a Hub id, got {self.init_from!r}"
            )
        self._check_relations(name)
        schedule = self.schedule(2)  # validates the endpoints
        if self.objective == "elbo" and not is_mask_only(schedule):
            raise ConfigError(
                f"{name}: objective 'elbo' is the bound of a mask-only schedule, and this one replaces tokens "
                "(noise_schedule mask_and_replace); use objective 'vlb' or 'masked_ce', or the reference schedule"
            )

    def _check_relations(self, name: str) -> None:
        """Values that are each valid but contradict another: sampling steps beyond T, a negative pad id, a
        final learning rate above the peak."""
        if self.sample_steps > self.num_timesteps:
            raise ConfigError(
                f"{name}: sample_steps={self.sample_steps} is more than the num_timesteps={self.num_timesteps} "
                f"diffusion steps; use --sample-steps <= {self.num_timesteps}"
            )
        if self.text_pad_token_id is not None and self.text_pad_token_id < 0:
            raise ConfigError(
                f"{name}: text_pad_token_id must be a token id >= 0, got {self.text_pad_token_id} (leave it out to "
                "use the tokenizer's)"
            )
        if self.min_lr > self.lr:
            raise ConfigError(
                f"{name}: min_lr={self.min_lr} is above lr={self.lr}, so the learning rate would rise; use "
                "--min-lr <= --lr"
            )

    def schedule(self, num_classes: int) -> MaskReplaceSchedule:
        """The noise schedule for a codebook of ``num_classes`` tokens."""
        if self.noise_schedule == "reference":
            base = MaskReplaceSchedule(num_classes, self.num_timesteps)
        else:
            base = MaskReplaceSchedule.paper_mask_and_replace(num_classes, self.num_timesteps)
        overrides = {
            key: getattr(self, key)
            for key in ("alpha_cum_start", "alpha_cum_end", "gamma_cum_start", "gamma_cum_end")
            if getattr(self, key) is not None
        }
        try:
            return dataclasses.replace(base, **overrides)
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: invalid noise schedule: {err}") from None

    def denoiser_config(
        self,
        num_classes: int,
        token_shape: tuple[int, int],
        cond_dim: int | None,
        num_class_labels: int | None = None,
    ) -> DenoiserConfig:
        """The preset with this config's overrides, the data's K and grid, T, and the condition: the width
        ``cond_dim`` of a text condition, or the rows ``num_class_labels`` of a class model's label table."""
        overrides = {
            key: getattr(self, key)
            for key in ("num_layers", "dim", "num_heads", "mlp_ratio", "activation")
            if getattr(self, key) is not None
        }
        try:
            return DenoiserConfig.preset(
                self.preset,
                **overrides,
                num_classes=num_classes,
                height=token_shape[0],
                width=token_shape[1],
                num_timesteps=self.num_timesteps,
                cond_dim=cond_dim,
                num_class_labels=num_class_labels,
            )
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: invalid denoiser settings: {err}") from None

    def resolved_cond_dim(self) -> int:
        """Width of a trained text model: ``cond_dim`` or the preset's."""
        value = self.cond_dim if self.cond_dim is not None else DENOISER_PRESETS[self.preset].cond_dim
        return int(value or DENOISER_PRESETS[self.preset].dim)
