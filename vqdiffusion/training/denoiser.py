"""Training the VQ-Diffusion denoiser on pre-tokenized data (SPEC section 4).

Input: a token folder from :func:`vqdiffusion.training.tokenize.tokenize_dataset` (``vqdiffusion tokenize``).
Per example and optimizer step:

1. draw a step index t from the :class:`ImportanceTimestepSampler` (uniform until every t was seen more
   than 10 times, then p(t) ~ sqrt(E[L_t^2])), and corrupt x0 to x_t ~ q(x_t | x0);
2. with probability ``cond_drop_prob`` replace the condition by the learned null condition (Improved
   VQ-Diffusion's classifier-free guidance; the null is a parameter trained with the model);
3. predict log p(x0 | x_t, y) and take ``diffusion_loss``: the KL to the true posterior (the decoder NLL at
   t index 0) plus the weighted auxiliary cross-entropy, divided by p(t) and by the number of tokens N.

The loss of a step is the mean over the global batch.  AdamW (no weight decay on biases, norms and
embeddings), linear warm-up then constant or cosine learning rate, gradient clipping, an EMA of every
trained parameter, optional bf16/fp16 autocast (fp16 with a GradScaler, CUDA only).

Condition kinds (from the token folder): ``captions`` use a CLIP text transformer: either a local frozen
one (``text_encoder_dir`` + ``tokenizer_dir``) or, with ``text_model="train"``, a small CLIP-architecture
``CLIPTextModel`` with the character tokenizer of :mod:`vqdiffusion.text_vocab`, trained jointly (width =
``cond_dim``); ``classes`` use a learned class embedding with a null class; ``unconditional`` uses none.

Determinism.  Everything random in a step (t, the dropped conditions, the corruption noise) comes from a
generator seeded by ``(seed, step)`` and is drawn for the whole global batch, and the batch of step s is a
pure function of ``(seed, s)`` (:class:`StepBatchSampler`).  So a run resumed from a checkpoint reproduces an
uninterrupted one bit for bit on CPU, and a DDP run computes the same objective as one process with the
same global batch.

Outputs under ``output_dir``: ``checkpoints/step_XXXXXXXX.safetensors`` (see
:meth:`DenoiserTrainer.state_tensors`), ``metrics.csv`` (and TensorBoard events when installed),
``samples/step_XXXXXXXX.png`` (top row: the data's first tokens decoded; bottom row: samples for the same
conditions from the EMA weights), ``train_config.json`` and, at the end, ``model/`` (an exported pipeline,
loadable with ``VQDiffusionPipeline.from_pretrained`` / ``vqdiffusion generate --model``).

Distributed training (torch.distributed DDP, launched with ``torchrun``)::

    # one machine, 4 processes (GPUs: NCCL, one GPU per process; CPU: gloo)
    torchrun --standalone --nproc-per-node 4 -m vqdiffusion.cli train TOKENS --out runs/dm --batch-size 256

    # two machines with 8 GPUs each: run on every node, with its --node-rank; HOST is node 0's address
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m vqdiffusion.cli train TOKENS --out runs/dm --batch-size 1024

The processes read ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set by ``torchrun``.  ``--batch-size`` is the global
batch of one optimizer step; it must be divisible by world size x ``grad_accum``, and each process runs
micro-batches of ``batch_size / (world_size * grad_accum)``.  The token folder and ``--out`` must be on a
file system every node can read (only global rank 0 writes: metrics, samples, checkpoints, the export;
every rank reads the checkpoint on ``--resume``).  Per-step importance-sampler statistics are gathered from
all ranks, so every rank keeps the same sampler state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import ConfigBase, ConfigError, check_positive
from ..diffusion import ImportanceTimestepSampler, MaskReplaceSchedule, diffusion_loss, q_sample
from ..io import load_into
from ..models.conditions import ClassCondition, CLIPTextCondition, LearnedNullCondition
from ..models.denoiser import ACTIVATIONS, DENOISER_PRESETS, Denoiser, DenoiserConfig
from ..sampling import SamplingOptions, guided_predictor, sample_tokens
from ..text_vocab import build_char_clip_tokenizer, caption_words
from .common import (
    EMA,
    LR_SCHEDULES,
    MIXED_PRECISION,
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
from .tokenize import TokenDataset

__all__ = [
    "CHECKPOINT_KIND",
    "DenoiserTrainConfig",
    "DenoiserTrainModule",
    "DenoiserTrainer",
    "StepBatches",
    "StepDraws",
    "add_train_parser",
    "check_resume_config",
    "run_train",
    "train_denoiser",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "denoiser"
NOISE_SCHEDULES = ("reference", "mask_and_replace")
TEXT_MODELS = ("pretrained", "train")
# Fields that may differ between a checkpoint's config and the config resuming it.
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
    }
)
_INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("token_dir", "output_dir"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ConfigError(f"{name}: {field} must be a non-empty path string, got {getattr(self, field)!r}")
        choices = {
            "preset": tuple(sorted(DENOISER_PRESETS)),
            "noise_schedule": NOISE_SCHEDULES,
            "text_model": TEXT_MODELS,
            "lr_schedule": LR_SCHEDULES,
            "mixed_precision": MIXED_PRECISION,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"{name}: {field} must be one of {list(allowed)}, got {getattr(self, field)!r}")
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
        optional = {
            "num_layers": self.num_layers,
            "dim": self.dim,
            "num_heads": self.num_heads,
            "cond_dim": self.cond_dim,
            "lr_decay_steps": self.lr_decay_steps,
            "text_pad_token_id": self.text_pad_token_id,
        }
        for key, value in {**positive, **nonneg, **optional}.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name}: {key} must be an integer, got {value!r}")
        check_positive(name, **positive, lr=self.lr)
        for key, value in optional.items():
            if value is not None and key != "text_pad_token_id":
                check_positive(name, **{key: value})
        for key, value in {**nonneg, "min_lr": self.min_lr, "weight_decay": self.weight_decay}.items():
            if not _is_number(value) or not value >= 0:
                raise ConfigError(f"{name}: {key} must be a number >= 0, got {value!r}")
        if not _is_number(self.aux_weight) or not self.aux_weight >= 0:
            raise ConfigError(f"{name}: aux_weight must be a number >= 0, got {self.aux_weight!r}")
        if len(self.mask_weight) != 2 or not all(_is_number(w) and w >= 0 for w in self.mask_weight):
            raise ConfigError(f"{name}: mask_weight must be two numbers >= 0 ([MASK], other), got {self.mask_weight}")
        if not _is_number(self.cond_drop_prob) or not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"{name}: cond_drop_prob must be in [0, 1), got {self.cond_drop_prob!r}")
        if not _is_number(self.ema_decay) or not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{name}: ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if len(self.adam_betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"{name}: adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.grad_clip is not None:
            check_positive(name, grad_clip=self.grad_clip)
        if self.mlp_ratio is not None:
            check_positive(name, mlp_ratio=self.mlp_ratio)
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
        self.schedule(2)  # validates the endpoints

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

    def denoiser_config(self, num_classes: int, token_shape: tuple[int, int], cond_dim: int | None) -> DenoiserConfig:
        """The preset with this config's overrides, the data's K and grid, T and the condition width."""
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
            )
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}: invalid denoiser settings: {err}") from None

    def resolved_cond_dim(self) -> int:
        """Width of a trained condition (text model or class embedding): ``cond_dim`` or the preset's."""
        value = self.cond_dim if self.cond_dim is not None else DENOISER_PRESETS[self.preset].cond_dim
        return int(value or DENOISER_PRESETS[self.preset].dim)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------
# Model pieces
# ---------------------------------------------------------------------------------------------------------


def init_denoiser_weights(denoiser: nn.Module, std: float = _INIT_STD) -> None:
    """The authors' initialisation of a fresh denoiser: Linear and Embedding weights N(0, std^2), biases 0
    (LayerNorms keep weight 1, bias 0)."""
    with torch.no_grad():
        for module in denoiser.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()


def build_text_model(config: DenoiserTrainConfig) -> CLIPTextCondition:
    """A fresh CLIP-architecture text model of width ``cond_dim`` with the character tokenizer (whole
    tokens for ``text_words``) (``text_model="train"``); its parameters require gradients."""
    from transformers import CLIPTextConfig, CLIPTextModel

    width = config.resolved_cond_dim()
    if width % config.text_heads:
        raise ConfigError(f"text_heads={config.text_heads} does not divide the text width cond_dim={width}")
    tokenizer = build_char_clip_tokenizer(model_max_length=config.text_max_length, words=config.text_words)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.text_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = CLIPTextCondition(CLIPTextModel(text_config), tokenizer)
    text.text_model.requires_grad_(True)
    return text


def text_model_config_dict(text: CLIPTextCondition) -> dict[str, Any]:
    """The text model's ``CLIPTextConfig`` as plain JSON."""
    return json.loads(text.text_model.config.to_json_string())


class DenoiserTrainModule(nn.Module):
    """Every trained module: the denoiser plus, when present, the trained text model (``text``), the learned
    null text (``null``) or the class embedding (``class_embedding``, its last row the null class).

    ``forward(x_t [B, N], t [B], cond_input, drop [B] bool) -> log p(x0) [B, K, N]`` where ``cond_input`` is
    token ids [B, L] (trained text), a condition [B, L, D] (frozen text, encoded outside), labels [B]
    (classes) or None (unconditional).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        text: CLIPTextCondition | None = None,
        null: LearnedNullCondition | None = None,
        class_embedding: ClassCondition | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.text = text
        self.null = null
        self.class_embedding = class_embedding

    def condition(self, cond_input: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor | None:
        """The condition sequence [B, L, D] with the rows where ``drop`` is set replaced by the null.

        The null always takes part in the graph (``torch.where``), so DDP never sees an unused parameter.
        """
        if cond_input is None:
            return None
        if self.class_embedding is not None:
            labels = cond_input
            if self.class_embedding.learnable_null:
                labels = torch.where(drop, torch.full_like(labels, self.class_embedding.num_classes), labels)
            return self.class_embedding.embedding(labels)[:, None]
        cond = self.text.encode_ids(cond_input) if self.text is not None else cond_input
        if self.null is not None:
            null = self.null(cond.shape[0]).to(cond.dtype)
            cond = torch.where(drop[:, None, None], null, cond)
        return cond

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond_input: torch.Tensor | None, drop: torch.Tensor
    ) -> torch.Tensor:
        return self.denoiser(x_t, t, self.condition(cond_input, drop), validate=False)


@dataclasses.dataclass
class StepDraws:
    """The random quantities of one optimizer step, for the whole global batch G.

    ``t`` [G] long step indices, ``p_t`` [G] float32 their sampling probabilities, ``drop`` [G] bool (the
    condition is replaced by the null), ``x_t`` [G, N] long corrupted tokens.
    """

    t: torch.Tensor
    p_t: torch.Tensor
    drop: torch.Tensor
    x_t: torch.Tensor


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the draws of ``step`` (numpy's SeedSequence over ``(seed, step)``)."""
    state = np.random.SeedSequence([int(seed), int(step), 0x7D1F]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


class CaptionIds:
    """Picklable caption tokenizer for DataLoader workers: the same ids as ``CLIPTextCondition.tokenize``
    (padding to ``max_length``, truncation keeping end-of-text, ``pad_token_id`` after end-of-text), minus
    its per-prompt truncation warning."""

    def __init__(self, tokenizer: Any, max_length: int, pad_token_id: int | None) -> None:
        self.tokenizer, self.max_length, self.pad_token_id = tokenizer, max_length, pad_token_id

    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        if self.pad_token_id is not None:
            first_eos = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
            ids = ids.masked_fill(torch.arange(ids.shape[1])[None] > first_eos, self.pad_token_id)
        return ids


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


class DenoiserTrainer:
    """The state of a denoiser training run and one optimizer step.

    Args:
        config: the run.
        data: the token folder (fixes K, the grid and the condition kind).
        device: this process's device.
        rank, world_size: this process's place in a DDP group (``world_size > 1`` needs an initialised
            ``torch.distributed`` process group; the module is then wrapped in DDP).

    Attributes: ``module`` (:class:`DenoiserTrainModule`), ``frozen_text`` (a frozen pretrained text model
    or None), ``schedule``, ``sampler`` (:class:`ImportanceTimestepSampler`), ``optimizer``, ``ema``,
    ``scaler`` (fp16 only), ``step`` (completed optimizer steps).
    """

    def __init__(
        self,
        config: DenoiserTrainConfig,
        data: TokenDataset,
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config, self.data = config, data
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        per_rank = world_size * config.grad_accum
        if config.batch_size % per_rank:
            raise ConfigError(
                f"batch_size={config.batch_size} (the global batch) is not divisible by world size {world_size} x "
                f"grad_accum {config.grad_accum}"
            )
        self.micro_batch = config.batch_size // per_rank
        if config.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("mixed_precision='fp16' needs a CUDA device (GradScaler); use 'bf16' or 'no' here")
        self.kind = data.kind
        k = data.num_classes
        self.schedule = config.schedule(k)

        seed_everything(config.seed)  # identical initialisation on every rank
        self.frozen_text: CLIPTextCondition | None = None
        text: CLIPTextCondition | None = None
        class_embedding: ClassCondition | None = None
        null: LearnedNullCondition | None = None
        use_null = config.cond_drop_prob > 0
        if self.kind == "captions":
            if config.text_model == "train":
                text = build_text_model(config)
                cond_dim = text.hidden_size
            else:
                if config.text_encoder_dir is None:
                    raise ConfigError(
                        f"{data.root} holds captions: give text_encoder_dir and tokenizer_dir (a local CLIP, "
                        "frozen) or text_model='train' (train a small text model jointly)"
                    )
                self.frozen_text = CLIPTextCondition.from_pretrained(
                    config.text_encoder_dir, config.tokenizer_dir, pad_token_id=config.text_pad_token_id
                ).to(self.device)
                cond_dim = self.frozen_text.hidden_size
                if config.cond_dim is not None and config.cond_dim != cond_dim:
                    raise ConfigError(
                        f"cond_dim={config.cond_dim} differs from the text encoder's width {cond_dim}; drop cond_dim"
                    )
        elif self.kind == "classes":
            cond_dim = config.resolved_cond_dim()
            class_embedding = ClassCondition(len(data.class_names), cond_dim, learnable_null=use_null)
            with torch.no_grad():
                class_embedding.embedding.weight.normal_(0.0, _INIT_STD)
        else:
            cond_dim = None
        denoiser_config = config.denoiser_config(k, data.token_shape, cond_dim)
        denoiser = Denoiser(denoiser_config)
        init_denoiser_weights(denoiser)
        self.text_encoder = text or self.frozen_text
        if self.kind == "captions" and use_null:
            # Start the null where real conditions live: the (unit-norm) encoding of the empty prompt.
            with torch.no_grad():
                ids = self.text_encoder.tokenize([""]).to(self.device)
                empty = self.text_encoder.encode_ids(ids)[0].float().cpu()
            null = LearnedNullCondition(empty.clone())
        self.module = DenoiserTrainModule(denoiser, text=text, null=null, class_embedding=class_embedding)
        self.module.to(self.device).train()
        self.ddp_module: nn.Module = self.module
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers are constants (CLIP's position ids): no per-forward broadcast
            keyword = "forward_sync_buffers"  # torch >= 2.13; earlier versions call it broadcast_buffers
            if keyword not in inspect.signature(DistributedDataParallel.__init__).parameters:
                keyword = "broadcast_buffers"
            self.ddp_module = DistributedDataParallel(self.module, device_ids=device_ids, **{keyword: False})
            seed_everything(config.seed * world_size + rank)  # per-rank global RNG (DiT); draws use step_seed

        decay, no_decay = [], []
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "embedding" in name else decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=tuple(config.adam_betas),
        )
        self.ema = EMA(self.module, config.ema_decay)
        self.sampler = ImportanceTimestepSampler(self.schedule.num_timesteps, device=self.device)
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.step = 0
        self.caption_ids: CaptionIds | None = None
        if self.text_encoder is not None:
            tokenizer = self.text_encoder.tokenizer
            self.caption_ids = CaptionIds(tokenizer, self.text_encoder.max_length, self.text_encoder.pad_token_id)

    # -- small helpers ----------------------------------------------------------------------------------

    @property
    def denoiser(self) -> Denoiser:
        return self.module.denoiser

    @property
    def has_null(self) -> bool:
        """Whether a null condition is trained (classifier-free guidance is possible)."""
        if self.module.class_embedding is not None:
            return self.module.class_embedding.learnable_null
        return self.module.null is not None

    def lr(self, step: int) -> float:
        cfg = self.config
        return lr_at(step, cfg.lr, cfg.lr_warmup, cfg.lr_decay_steps or cfg.steps, cfg.lr_schedule, cfg.min_lr)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.config.mixed_precision, self.device)

    def rank_rows(self) -> list[int]:
        """Positions in the global batch of this rank's examples, micro-step by micro-step.

        Micro-step m of rank r holds global rows ``(m * world_size + r) * B .. + B - 1`` (B = micro batch).
        """
        b, world = self.micro_batch, self.world_size
        return [(m * world + self.rank) * b + i for m in range(self.config.grad_accum) for i in range(b)]

    def condition_inputs(self, indices: list[int]) -> torch.Tensor | None:
        """The raw condition of dataset items: caption token ids [n, L], labels [n] or None."""
        if self.kind == "captions":
            return self.caption_ids([self.data.captions[i] for i in indices])
        if self.kind == "classes":
            return self.data.labels[indices].clone()
        return None

    def encode_condition(self, cond_input: torch.Tensor | None) -> torch.Tensor | None:
        """Move ``cond_input`` to the device; a frozen text model encodes it here (no gradient)."""
        if cond_input is None:
            return None
        cond_input = cond_input.to(self.device, non_blocking=True)
        if self.frozen_text is not None:
            with torch.no_grad(), self.autocast():
                return self.frozen_text.encode_ids(cond_input)
        return cond_input

    def draws(self, step: int, x0: torch.Tensor) -> StepDraws:
        """The draws of ``step`` for the global batch ``x0`` [G, N] (on the device), from a generator seeded by
        :func:`step_seed`: t and p(t) from the importance sampler, then the drop coins, then the corruption."""
        generator = torch.Generator(device=self.device).manual_seed(step_seed(self.config.seed, step))
        t, p_t = self.sampler.sample(x0.shape[0], generator=generator)
        coins = torch.rand(x0.shape[0], generator=generator, device=self.device)
        drop = coins < self.config.cond_drop_prob if self.has_null else torch.zeros_like(coins, dtype=torch.bool)
        x_t = q_sample(self.schedule, x0, t, generator)
        return StepDraws(t=t, p_t=p_t, drop=drop, x_t=x_t)

    def _all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` [C, accum * B] per rank -> [C, G] in global row order (identity for one process)."""
        if self.world_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        c, accum, b = local.shape[0], self.config.grad_accum, self.micro_batch
        stacked = torch.stack([p.view(c, accum, b) for p in parts], dim=2)  # [C, accum, world, B]
        return stacked.reshape(c, -1)

    # -- one optimizer step -----------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step.

        Args:
            batch: ``x0`` [G, N] int tokens of the whole global batch, and ``cond`` (this rank's condition
                inputs for :meth:`rank_rows`, micro-step by micro-step) unless the data are unconditional.
        Returns:
            Detached device tensors (no host synchronisation): ``loss`` (the importance-weighted loss per
            token), ``vb`` (the variational bound term per token) and ``aux`` (auxiliary cross-entropy per
            token), global-batch means; ``grad_norm`` (before clipping; NaN without clipping).
        """
        cfg, b = self.config, self.micro_batch
        x0 = batch["x0"].to(self.device, non_blocking=True).long()
        n = x0.shape[1]
        draws = self.draws(self.step, x0)
        cond_all = self.encode_condition(batch.get("cond"))
        set_lr(self.optimizer, self.lr(self.step))
        self.module.train()
        local_terms = []
        for m in range(cfg.grad_accum):
            start = (m * self.world_size + self.rank) * b
            rows = slice(start, start + b)
            cond = cond_all[m * b : (m + 1) * b] if cond_all is not None else None
            last = m == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.ddp_module.no_sync()
            with sync:
                with self.autocast():
                    log_p = self.ddp_module(draws.x_t[rows], draws.t[rows], cond, draws.drop[rows])
                terms = diffusion_loss(
                    self.schedule,
                    log_p.float(),
                    x0[rows],
                    draws.x_t[rows],
                    draws.t[rows],
                    aux_weight=cfg.aux_weight,
                    adaptive_aux=cfg.adaptive_aux,
                    mask_weight=tuple(cfg.mask_weight),
                )
                per_example = terms.total(draws.p_t[rows]) / n
                loss = per_example.sum() / (b * cfg.grad_accum)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            local_terms.append(torch.stack([terms.vb.detach(), per_example.detach(), terms.aux.detach()]))
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.tensor(float("nan"), device=self.device)
        if cfg.grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.module)
        # every rank folds the whole global batch into its sampler, so all ranks keep the same state
        gathered = self._all_gather_rows(torch.cat(local_terms, dim=1).float())  # [3, G]
        self.sampler.update(draws.t, gathered[0])
        self.step += 1
        return {
            "loss": gathered[1].mean(),
            "vb": gathered[0].mean() / n,
            "aux": gathered[2].mean() / n,
            "grad_norm": grad_norm.detach().float(),
        }

    # -- sampling ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, cond_input: torch.Tensor | None, num: int, *, ema: bool = True, seed: int = 0) -> torch.Tensor:
        """Generate ``num`` token grids [num, h, w] for ``cond_input`` (guidance 5 with a null condition, else
        1; ``sample_steps`` steps), with the EMA weights unless ``ema=False``.  The live weights are restored
        exactly afterwards and no global RNG state is used."""
        cfg = self.denoiser.config
        backup = None
        if ema:
            backup = {name: p.detach().clone() for name, p in self.module.named_parameters() if name in self.ema.shadow}
            self.ema.copy_to(self.module)
        self.module.eval()
        try:
            with self.autocast():
                cond_input = self.encode_condition(cond_input)
                zeros = torch.zeros(num, dtype=torch.bool, device=self.device)
                cond = self.module.condition(cond_input, zeros)
                null = self.module.condition(cond_input, ~zeros) if self.has_null else None
                scale = 5.0 if null is not None else 1.0
                predict = guided_predictor(self.denoiser, cond, null, scale)
                options = SamplingOptions(
                    num_inference_steps=min(self.config.sample_steps, self.schedule.num_timesteps),
                    guidance_scale=scale,
                    truncation_rate=1.0,
                )
                generator = torch.Generator(device=self.device).manual_seed(seed)
                tokens = sample_tokens(
                    predict,
                    self.schedule,
                    num,
                    cfg.num_tokens,
                    options,
                    generator=generator,
                    device=self.device,
                    progress=False,
                )
        finally:
            if backup is not None:
                params = dict(self.module.named_parameters())
                for name, value in backup.items():
                    params[name].data.copy_(value)
            self.module.train()
        return tokens.view(num, cfg.height, cfg.width)

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole training state as ``(tensors, meta)`` for :func:`save_checkpoint`.

        Tensors: ``model.*`` (the :class:`DenoiserTrainModule` state dict: ``denoiser.*``, ``text.*`` for a
        trained text model, ``null.embedding``, ``class_embedding.*``), ``ema.*`` (the same keys, parameters
        only), ``optimizer.*``, ``sampler.loss_sq`` / ``sampler.count``, ``rng.*`` (rank 0's global RNG).
        Meta: ``kind``, ``step``, ``config`` (the resolved :class:`DenoiserTrainConfig`), ``denoiser_config``,
        ``schedule``, ``condition`` (captions / classes / unconditional), ``null_condition`` (bool),
        ``text_model_config`` (trained text model), ``text_pad_token_id``, ``class_names``, ``data`` (K,
        token grid, image size, VQ-VAE folder of the token folder), ``optimizer``, ``scaler`` (fp16),
        ``rng``, ``lr``, ``world_size``.
        """
        tensors = with_prefix("model", self.module.state_dict())
        tensors.update(with_prefix("ema", self.ema.state_dict()))
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer, "optimizer")
        tensors.update(opt_tensors)
        tensors.update(with_prefix("sampler", self.sampler.state_dict()))
        rng_tensors, rng_meta = capture_rng_state("rng")
        tensors.update(rng_tensors)
        data_meta = self.data.meta
        meta = {
            "kind": CHECKPOINT_KIND,
            "step": self.step,
            "config": self.config.to_dict(),
            "denoiser_config": self.denoiser.config.to_dict(),
            "schedule": self.schedule.to_dict(),
            "condition": self.kind,
            "null_condition": self.has_null,
            "text_model_config": text_model_config_dict(self.module.text) if self.module.text is not None else None,
            "text_pad_token_id": self.text_encoder.pad_token_id if self.text_encoder is not None else None,
            "class_names": self.data.class_names,
            "data": {
                "num_classes": self.data.num_classes,
                "token_shape": list(self.data.token_shape),
                "image_size": data_meta.get("image_size"),
                "vqvae_dir": data_meta.get("vqvae_dir"),
                "count": len(self.data),
            },
            "optimizer": opt_meta,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_meta,
            "lr": self.lr(max(0, self.step - 1)),
            "world_size": self.world_size,
        }
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
        """Restore everything :meth:`state_tensors` wrote (check compatibility with
        :func:`check_resume_config` first)."""
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{source} is a {meta.get('kind')!r} checkpoint, not a denoiser training checkpoint")
        load_into(self.module, take_prefix("model", tensors), f"{source} (model)")
        self.ema.load_state_dict({k: v.to(self.device) for k, v in take_prefix("ema", tensors).items()})
        load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.sampler.load_state_dict(take_prefix("sampler", tensors))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        restore_rng_state(tensors, meta["rng"], "rng")
        self.step = int(meta["step"])
        if self.world_size > 1:
            seed_everything(step_seed(self.config.seed * self.world_size + self.rank, self.step))

    def save(self, path: str | os.PathLike) -> None:
        tensors, meta = self.state_tensors()
        save_checkpoint(path, tensors, meta)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        config: DenoiserTrainConfig | None = None,
        data: TokenDataset | None = None,
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> DenoiserTrainer:
        """A trainer restored from ``path``; ``config`` (default: the checkpoint's) may change only
        :data:`RESUMABLE_FIELDS` and must give the same model (ConfigError naming the differing fields)."""
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{path} is a {meta.get('kind')!r} checkpoint, not a denoiser training checkpoint")
        saved = DenoiserTrainConfig.from_dict(meta["config"])
        config = saved if config is None else config
        data = TokenDataset(config.token_dir) if data is None else data
        check_resume_config(meta, config, str(path))
        trainer = cls(config, data, device, rank=rank, world_size=world_size)
        new_model = trainer.denoiser.config.to_dict()
        changed = sorted(k for k in new_model if new_model[k] != meta["denoiser_config"].get(k))
        if changed:
            details = ", ".join(f"{k}: {meta['denoiser_config'].get(k)!r} -> {new_model[k]!r}" for k in changed)
            raise ConfigError(f"cannot resume {path}: the denoiser config differs ({details})")
        if trainer.schedule.to_dict() != meta["schedule"]:
            raise ConfigError(f"cannot resume {path}: the noise schedule differs ({meta['schedule']})")
        trainer.load_state_tensors(tensors, meta, str(path))
        return trainer


def check_resume_config(meta: dict[str, Any], new: DenoiserTrainConfig, source: str) -> None:
    """Raise ConfigError if ``new`` differs from the checkpoint's config outside :data:`RESUMABLE_FIELDS`;
    the message names every differing field."""
    saved = DenoiserTrainConfig.from_dict(meta["config"])
    old_d, new_d = saved.to_dict(), new.to_dict()
    changed = sorted(k for k in old_d if old_d[k] != new_d[k] and k not in RESUMABLE_FIELDS)
    if changed:
        details = ", ".join(f"{k}: {old_d[k]!r} -> {new_d[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {source} with a different model or training setup ({details}); only "
            f"{sorted(RESUMABLE_FIELDS)} may change"
        )
    if saved.steps != new.steps and new.lr_schedule == "cosine" and new.lr_decay_steps is None:
        logger.warning("steps changed from %d to %d: the cosine schedule is stretched", saved.steps, new.steps)


# ---------------------------------------------------------------------------------------------------------
# Data: one item per step
# ---------------------------------------------------------------------------------------------------------


class StepBatches(Dataset):
    """Map-style dataset indexed by the step: item ``s`` is the batch of optimizer step ``s`` as
    :meth:`DenoiserTrainer.train_step` takes it: ``x0`` [G, N] (the global batch's tokens, in the token
    folder's int dtype) and ``cond`` (caption ids [R, L] or labels [R] of this rank's R rows, see
    :meth:`DenoiserTrainer.rank_rows`).  ``order`` fixes which items form each step's batch."""

    def __init__(self, data: TokenDataset, order: StepBatchSampler, rows: list[int], caption_ids: CaptionIds | None):
        self.data, self.order, self.rows, self.caption_ids = data, order, rows, caption_ids

    def __len__(self) -> int:
        return self.order.end_step

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        indices = self.order.batch(step)
        batch = {"x0": self.data.tokens[indices].reshape(len(indices), -1)}
        mine = [indices[r] for r in self.rows]
        if self.data.kind == "captions":
            batch["cond"] = self.caption_ids([self.data.captions[i] for i in mine])
        elif self.data.kind == "classes":
            batch["cond"] = self.data.labels[mine]
        return batch


# ---------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _setup_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Read torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; join (or reuse) the process group: NCCL on
    CUDA, gloo on CPU.  Returns the rank info and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group ({dist.get_rank()}/{dist.get_world_size()}) disagrees with RANK/WORLD_SIZE")
    return _Dist(rank, world, local_rank, owns), device


def _save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """PNG of image rows, each [n, 3, H, W] in [-1, 1]."""
    pixels = torch.cat(rows).float().cpu().clamp(-1, 1)
    pixels = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [R n, H, W, 3]
    n, side_h, side_w = rows[0].shape[0], pixels.shape[1], pixels.shape[2]
    grid = pixels.reshape(len(rows), n, side_h, side_w, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(len(rows) * side_h, n * side_w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.ascontiguousarray(grid)).save(tmp)
    os.replace(tmp, path)


def _load_sample_vqvae(data: TokenDataset, device: torch.device):
    from .vqvae import load_vqvae

    folder = data.vqvae_dir
    if folder is None or not Path(folder).exists():
        logger.warning("the token folder's VQ-VAE %s is missing: no sample grids", folder)
        return None
    return load_vqvae(folder).to(device).eval()


def train_denoiser(config: DenoiserTrainConfig, *, resume: bool | str | os.PathLike = False) -> Path:
    """Train a denoiser as described by ``config``; returns the exported pipeline folder ``output_dir/model``.

    Args:
        config: the run.
        resume: ``False`` starts a fresh run (refusing an ``output_dir`` that already holds checkpoints);
            ``True`` continues from the latest ``output_dir/checkpoints/step_*.safetensors``; a path continues
            from that checkpoint.  A resumed run reaches the same parameters as an uninterrupted one (bit for
            bit on CPU) as long as only :data:`RESUMABLE_FIELDS` change.

    Under ``torchrun`` every process calls this; see the module docstring.  Class-conditional and
    unconditional runs train and checkpoint but are not exported (the pipeline is text-to-image); the
    return value is then the output folder.
    """
    world, device = _setup_distributed(config.device)
    try:
        return _train(config, resume, world, device)
    finally:
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: DenoiserTrainConfig, resume: bool | str | os.PathLike, world: _Dist, device: torch.device) -> Path:
    out = Path(config.output_dir)
    ckpt_dir = out / "checkpoints"
    data = TokenDataset(config.token_dir)
    if resume:
        path = find_latest_checkpoint(ckpt_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"nothing to resume: no step_*.safetensors checkpoint in {ckpt_dir}")
        trainer = DenoiserTrainer.from_checkpoint(
            path, config, data, device, rank=world.rank, world_size=world.world_size
        )
        if world.main:
            logger.info("resuming %s at step %d", path, trainer.step)
    else:
        if find_latest_checkpoint(ckpt_dir) is not None:
            raise ValueError(f"{ckpt_dir} already holds checkpoints; resume the run (--resume) or choose another --out")
        trainer = DenoiserTrainer(config, data, device, rank=world.rank, world_size=world.world_size)
    start = trainer.step
    if start >= config.steps and world.main:
        logger.warning("the checkpoint is at step %d >= steps=%d; nothing to train", start, config.steps)

    metrics_log = None
    vqvae = None
    sample_indices = list(range(min(config.num_samples, len(data))))
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        config.save_json(out / "train_config.json")
        has_tensorboard = importlib.util.find_spec("tensorboard") is not None  # else CSV only, silently
        metrics_log = CSVLogger(
            out / "metrics.csv",
            resume_step=start if resume else None,
            tensorboard_dir=out / "tensorboard" if has_tensorboard else None,
        )
        vqvae = _load_sample_vqvae(data, device)
    order = StepBatchSampler(len(data), config.batch_size, config.seed, start, config.steps)
    loader = DataLoader(
        StepBatches(data, order, trainer.rank_rows(), trainer.caption_ids),
        batch_size=None,
        sampler=range(start, config.steps),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    sums: dict[str, torch.Tensor] = {}
    window, last_time = 0, time.perf_counter()
    bar = tqdm(
        total=config.steps, initial=start, disable=not (config.progress and world.main), desc="train", unit="step"
    )
    last_saved = None
    try:
        for batch in loader:
            result = trainer.train_step(batch)
            for key, value in result.items():
                sums[key] = sums.get(key, 0.0) + value
            window += 1
            step = trainer.step
            bar.update(1)
            final = step == config.steps
            if world.main and (step % config.log_every == 0 or final):
                values = {key: float(value) / window for key, value in sums.items()}  # one host sync
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"the loss became {values['loss']} by step {step}; lower the learning rate"
                    )
                now = time.perf_counter()
                values["samples_per_s"] = window * config.batch_size / max(now - last_time, 1e-9)
                values["lr"] = trainer.lr(step - 1)
                if config.grad_clip is None:
                    values.pop("grad_norm")
                metrics_log.log(step, values)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", samples_s=f"{values['samples_per_s']:.1f}"
                )
                sums, window, last_time = {}, 0, time.perf_counter()
            if world.main and vqvae is not None and (step % config.sample_every == 0 or final):
                cond_input = trainer.condition_inputs(sample_indices)
                tokens = trainer.sample(cond_input, len(sample_indices), seed=config.seed)
                real = data.tokens[sample_indices].long().to(device)
                with torch.no_grad():
                    rows = [vqvae.decode_tokens(real), vqvae.decode_tokens(tokens)]
                _save_grid(rows, out / "samples" / f"step_{step:08d}.png")
            if step % config.save_every == 0 or final:
                if world.main:
                    last_saved = checkpoint_path(ckpt_dir, step)
                    trainer.save(last_saved)
                    prune_checkpoints(ckpt_dir, config.keep_checkpoints)
                world.barrier()
    finally:
        bar.close()
        if metrics_log is not None:
            metrics_log.close()

    exported = out
    if world.main:
        if last_saved is None:  # nothing trained in this call: export the checkpoint we resumed from
            last_saved = find_latest_checkpoint(ckpt_dir)
            if last_saved is None:
                last_saved = checkpoint_path(ckpt_dir, trainer.step)
                trainer.save(last_saved)
        if data.kind == "captions":
            from .export import export_pipeline

            exported = export_pipeline(last_saved, out / "model")
        else:
            logger.warning("%s models are not exported (the pipeline is text-to-image); see %s", data.kind, ckpt_dir)
    world.barrier()
    return out / "model" if data.kind == "captions" else exported


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _pair(text: str) -> tuple[float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return values


# CLI flag -> (config field, type, help).  Every flag defaults to None ("not given") so that a resumed run
# takes the checkpoint's values and only the flags actually given override them.
_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--preset": ("preset", str, f"denoiser preset: {', '.join(sorted(DENOISER_PRESETS))} (default tiny)"),
    "--layers": ("num_layers", int, "transformer blocks (default: the preset's)"),
    "--dim": ("dim", int, "transformer width"),
    "--heads": ("num_heads", int, "attention heads"),
    "--cond-dim": ("cond_dim", int, "condition width of a trained text model or class embedding"),
    "--mlp-ratio": ("mlp_ratio", float, "MLP hidden width / dim"),
    "--activation": ("activation", str, "gelu2 or gelu"),
    "--noise-schedule": ("noise_schedule", str, "reference (default, mask only) or mask_and_replace (paper)"),
    "--timesteps": ("num_timesteps", int, "diffusion steps T (default 100)"),
    "--alpha-cum-start": ("alpha_cum_start", float, "cumulative keep probability at the first step"),
    "--alpha-cum-end": ("alpha_cum_end", float, "cumulative keep probability at the last step"),
    "--gamma-cum-start": ("gamma_cum_start", float, "cumulative mask probability at the first step"),
    "--gamma-cum-end": ("gamma_cum_end", float, "cumulative mask probability at the last step"),
    "--aux-weight": ("aux_weight", float, "weight of the auxiliary x0 loss (default 5e-4)"),
    "--mask-weight": ("mask_weight", _pair, "loss weights of [MASK] and other positions, e.g. 1,1"),
    "--text-encoder": ("text_encoder_dir", str, "local CLIP text model folder (frozen)"),
    "--tokenizer": ("tokenizer_dir", str, "local CLIP tokenizer folder"),
    "--text-pad-token-id": ("text_pad_token_id", int, "pad id after end-of-text (default: the tokenizer's)"),
    "--text-layers": ("text_layers", int, "layers of a trained text model (default 2)"),
    "--text-heads": ("text_heads", int, "heads of a trained text model (default 4)"),
    "--text-max-length": ("text_max_length", int, "positions of a trained text model (default 77)"),
    "--cond-drop-prob": ("cond_drop_prob", float, "fraction of null conditions (default 0.1; 0 = no guidance)"),
    "--batch-size": ("batch_size", int, "global batch per optimizer step (default 32)"),
    "--grad-accum": ("grad_accum", int, "micro-steps per optimizer step (default 1)"),
    "--lr": ("lr", float, "AdamW learning rate (default 3e-4)"),
    "--lr-warmup": ("lr_warmup", int, "linear warm-up steps (default 500)"),
    "--lr-schedule": ("lr_schedule", str, "constant (default) or cosine"),
    "--lr-decay-steps": ("lr_decay_steps", int, "end of the cosine decay (default: --steps)"),
    "--min-lr": ("min_lr", float, "final learning rate of the cosine schedule (default 0)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (default 0.045)"),
    "--grad-clip": ("grad_clip", float, "maximum gradient norm (default 1; 0 = no clipping)"),
    "--ema-decay": ("ema_decay", float, "EMA decay of the exported weights (default 0.999)"),
    "--mixed-precision": ("mixed_precision", str, "no (default), bf16 or fp16 (CUDA)"),
    "--steps": ("steps", int, "optimizer steps (default 10000)"),
    "--log-every": ("log_every", int, "metrics interval in steps (default 50)"),
    "--save-every": ("save_every", int, "checkpoint interval in steps (default 1000)"),
    "--sample-every": ("sample_every", int, "sample grid interval in steps (default 1000)"),
    "--sample-steps": ("sample_steps", int, "sampling steps of the grids (default 25)"),
    "--num-samples": ("num_samples", int, "images per grid (default 8)"),
    "--keep-checkpoints": ("keep_checkpoints", int, "checkpoints kept (default 2)"),
    "--seed": ("seed", int, "random seed (default 0)"),
    "--device": ("device", str, "auto (default), cpu, cuda, cuda:N"),
    "--num-workers": ("num_workers", int, "data loader processes (default 0)"),
}


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "train",
        help="train a VQ-Diffusion denoiser on a token folder",
        description="Train the denoiser on the output of `vqdiffusion tokenize`; writes checkpoints, "
        "metrics, sample grids and the exported pipeline OUT/model. Under torchrun, trains with DDP.",
    )
    parser.add_argument("token_dir", metavar="TOKEN_DIR", help="token folder from `vqdiffusion tokenize`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument(
        "--train-text-model",
        dest="text_model",
        action="store_const",
        const="train",
        default=None,
        help="train a small CLIP-architecture text model (character tokenizer) jointly",
    )
    parser.add_argument(
        "--text-vocab",
        choices=["chars", "words"],
        default=None,
        help="tokenizer of a trained text model: chars (default) or words (the training captions' words are "
        "single tokens, other words are spelled out)",
    )
    parser.add_argument(
        "--no-adaptive-aux",
        dest="adaptive_aux",
        action="store_const",
        const=False,
        default=None,
        help="constant auxiliary loss weight (default: scaled by (1 - t/T) + 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, (field, kind, text) in _FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=None, help=text)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run ``train``; prints the exported model folder.  Bad settings raise ValueError/ConfigError/
    FileNotFoundError for the CLI."""
    fields = [field for field, _, _ in _FLAGS.values()] + ["text_model", "adaptive_aux"]
    overrides = {field: getattr(args, field) for field in fields if getattr(args, field, None) is not None}
    if overrides.get("grad_clip") == 0:
        overrides["grad_clip"] = None
    overrides["progress"] = not args.quiet
    overrides["token_dir"], overrides["output_dir"] = str(args.token_dir), str(args.out)
    resume_path = None
    if args.resume:
        resume_path = find_latest_checkpoint(Path(args.out) / "checkpoints")
        if resume_path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {Path(args.out) / 'checkpoints'}")
        meta = read_checkpoint_meta(resume_path)
        saved_vocab = "words" if meta["config"].get("text_words") else "chars"
        if args.text_vocab is not None and args.text_vocab != saved_vocab:
            raise ValueError(
                f"--text-vocab {args.text_vocab}: the checkpoint was trained with --text-vocab {saved_vocab}; "
                "the tokenizer cannot change on --resume"
            )
        config = DenoiserTrainConfig.from_dict({**meta["config"], **overrides})
    else:
        if args.text_vocab == "words":
            captions = TokenDataset(args.token_dir).captions
            if captions is None:
                raise ValueError(f"--text-vocab words needs a caption token folder; {args.token_dir} has none")
            overrides["text_words"] = caption_words(captions)
        config = DenoiserTrainConfig(**overrides)
    exported = train_denoiser(config, resume=resume_path or False)
    if int(os.environ.get("RANK", "0")) == 0:
        print(exported)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vqdiffusion.training.denoiser TOKEN_DIR --out DIR ...`` (the ``train`` command alone)."""
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="vqdiffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_train(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
