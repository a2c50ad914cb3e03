"""Training the VQ-Diffusion denoiser on pre-tokenized data (docs/design.md §5).

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

import contextlib
import copy
import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..data.tokens import TokenDataset
from ..diffusion import ImportanceTimestepSampler, q_sample
from ..io import load_into
from ..models.conditions import ConditionKind, PromptIds
from ..models.denoiser import Denoiser
from ..models.vqvae import VQVAE
from ..objectives import IMPORTANCE_SAMPLED, objective_loss
from ..pipeline import VQDiffusionPipeline
from .batching import StepBatchSampler
from .checkpoint import (
    DENOISER_CHECKPOINT,
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
from .denoiser_config import RESUMABLE_FIELDS, DenoiserTrainConfig
from .denoiser_modules import (
    adamw_param_groups,
    build_train_module,
    text_model_config_dict,
)
from .distributed import all_gather_rows, wrap_ddp
from .ema import EMA
from .export import training_defaults
from .init_from import init_from_model, machine_description
from .lr_schedule import lr_at, set_lr
from .runtime import autocast_context, seed_everything


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


class DenoiserTrainer:
    """The state of a denoiser training run and one optimizer step.

    Args:
        config: the run.
        data: the token folder (fixes K, the grid and the condition kind).
        device: this process's device.
        rank, world_size: this process's place in a DDP group (``world_size > 1`` needs an initialised
            ``torch.distributed`` process group; the module is then wrapped in DDP).
        initialise: load ``config.init_from``'s weights (a restored checkpoint replaces them anyway).

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
        initialise: bool = True,
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
        self.kind = data.condition_kind
        k = data.num_classes
        self.schedule = config.schedule(k)

        seed_everything(config.seed)  # identical initialisation on every rank
        self.module, self.frozen_text = build_train_module(config, data, self.device)
        # the training history of the model this run started from, and this run's own stage
        self.history: list[dict[str, Any]] = []
        if config.init_from is not None and initialise:
            self.history = init_from_model(
                self.module, config.init_from, schedule=self.schedule.to_dict(), vqvae_dir=data.meta.get("vqvae_dir")
            )
        self.stage: dict[str, Any] = {
            "command": " ".join(["vqdiffusion", *sys.argv[1:]]),
            "machine": machine_description(self.device) + (f" x {world_size} processes" if world_size > 1 else ""),
            "wall_time_s": 0.0,
        }
        self._clock = time.monotonic()
        self.text_encoder = self.module.text or self.frozen_text
        self.module.to(self.device).train()
        self.ddp_module: nn.Module = self.module
        if world_size > 1:
            self.ddp_module = wrap_ddp(self.module, self.device)
            seed_everything(config.seed * world_size + rank)  # per-rank global RNG (DiT); draws use step_seed

        self.optimizer = torch.optim.AdamW(
            adamw_param_groups(self.module, config.weight_decay), lr=config.lr, betas=tuple(config.adam_betas)
        )
        self.ema = EMA(self.module, config.ema_decay)
        self.sampler = ImportanceTimestepSampler(self.schedule.num_timesteps, device=self.device)
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.step = 0
        # picklable, for DataLoader workers; the truncation of long captions is not worth a warning per step
        self.caption_ids: PromptIds | None = None
        if self.text_encoder is not None:
            self.caption_ids = self.text_encoder.prompt_ids(warn_truncation=False)

    # -- small helpers ----------------------------------------------------------------------------------

    @property
    def denoiser(self) -> Denoiser:
        return self.module.denoiser

    @property
    def has_null(self) -> bool:
        """Whether a null condition is trained (classifier-free guidance is possible)."""
        return self.module.has_null

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
        if self.kind == ConditionKind.TEXT:
            return self.caption_ids([self.data.captions[i] for i in indices])
        if self.kind == ConditionKind.CLASS:
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
        importance = cfg.objective in IMPORTANCE_SAMPLED  # else the sampler stays uniform (never updated)
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
                terms = objective_loss(
                    cfg.objective,
                    self.schedule,
                    log_p.float(),
                    x0[rows],
                    draws.x_t[rows],
                    draws.t[rows],
                    aux_weight=cfg.aux_weight,
                    adaptive_aux=cfg.adaptive_aux,
                    mask_weight=tuple(cfg.mask_weight),
                )
                per_example = terms.total(draws.p_t[rows] if importance else None) / n
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
        gathered = all_gather_rows(  # [3, G]
            torch.cat(local_terms, dim=1).float(), self.world_size, cfg.grad_accum, self.micro_batch
        )
        if importance:
            self.sampler.update(draws.t, gathered[0])
        self.step += 1
        return {
            "loss": gathered[1].mean(),
            "vb": gathered[0].mean() / n,
            "aux": gathered[2].mean() / n,
            "grad_norm": grad_norm.detach().float(),
        }

    # -- sampling ---------------------------------------------------------------------------------------

    def pipeline(self, vqvae: VQVAE, *, ema: bool = True) -> VQDiffusionPipeline:
        """The pipeline of the run's current weights (the EMA weights unless ``ema=False``) on the trainer's
        device, for sample grids.  It holds copies: training is not affected and no global RNG state is used.
        Default sampling settings as exported (:func:`~vqdiffusion.training.export.training_defaults`)."""
        module = copy.deepcopy(self.module).eval()
        if ema:
            self.ema.copy_to(module)
        return VQDiffusionPipeline(
            vqvae=vqvae,
            denoiser=module.denoiser,
            schedule=self.schedule,
            text_encoder=module.text if module.text is not None else self.frozen_text,
            null_condition=module.null,
            null_class_label=module.null_label,
            defaults=training_defaults(self.schedule, self.has_null),
        )

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
            "kind": DENOISER_CHECKPOINT,
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
            "history": self.history,
            "stage": {**self.stage, "wall_time_s": self.wall_time_s()},
        }
        return tensors, meta

    def wall_time_s(self) -> float:
        """Seconds this stage has run, over every resumed part (since construction or the restored checkpoint)."""
        return float(self.stage["wall_time_s"]) + time.monotonic() - self._clock

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
        """Restore everything :meth:`state_tensors` wrote (check compatibility with
        :func:`check_resume_config` first)."""
        if meta.get("kind") != DENOISER_CHECKPOINT:
            raise ValueError(f"{source} is a {meta.get('kind')!r} checkpoint, not a denoiser training checkpoint")
        load_into(self.module, take_prefix("model", tensors), f"{source} (model)")
        self.ema.load_state_dict({k: v.to(self.device) for k, v in take_prefix("ema", tensors).items()})
        load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.sampler.load_state_dict(take_prefix("sampler", tensors))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        restore_rng_state(tensors, meta["rng"], "rng")
        self.step = int(meta["step"])
        self.history = list(meta.get("history") or [])
        stage = meta.get("stage") or {}
        command = self.stage["command"]
        if isinstance(stage.get("command"), str) and stage["command"] != command:
            command = stage["command"] if stage["command"].endswith(command) else f"{stage['command']} ; then {command}"
        self.stage = {**self.stage, "command": command, "wall_time_s": float(stage.get("wall_time_s", 0.0))}
        self._clock = time.monotonic()
        self.ema.num_updates = self.step  # one EMA update per optimizer step: the warm-up continues
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
        tensors, meta = load_checkpoint(path, DENOISER_CHECKPOINT)
        saved = DenoiserTrainConfig.from_dict(meta["config"])
        config = saved if config is None else config
        data = TokenDataset(config.token_dir) if data is None else data
        check_resume_config(DenoiserTrainConfig.from_dict(meta["config"]), config, RESUMABLE_FIELDS, str(path))
        trainer = cls(config, data, device, rank=rank, world_size=world_size, initialise=False)
        new_model = trainer.denoiser.config.to_dict()
        changed = sorted(k for k in new_model if new_model[k] != meta["denoiser_config"].get(k))
        if changed:
            details = ", ".join(f"{k}: {meta['denoiser_config'].get(k)!r} -> {new_model[k]!r}" for k in changed)
            raise ConfigError(f"cannot resume {path}: the denoiser config differs ({details})")
        if trainer.schedule.to_dict() != meta["schedule"]:
            raise ConfigError(f"cannot resume {path}: the noise schedule differs ({meta['schedule']})")
        trainer.load_state_tensors(tensors, meta, str(path))
        return trainer


class StepBatches(Dataset):
    """Map-style dataset indexed by the step: item ``s`` is the batch of optimizer step ``s`` as
    :meth:`DenoiserTrainer.train_step` takes it: ``x0`` [G, N] (the global batch's tokens, in the token
    folder's int dtype) and ``cond`` (caption ids [R, L] or labels [R] of this rank's R rows, see
    :meth:`DenoiserTrainer.rank_rows`).  ``order`` fixes which items form each step's batch."""

    def __init__(self, data: TokenDataset, order: StepBatchSampler, rows: list[int], caption_ids: PromptIds | None):
        self.data, self.order, self.rows, self.caption_ids = data, order, rows, caption_ids

    def __len__(self) -> int:
        return self.order.end_step

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        indices = self.order.batch(step)
        batch = {"x0": self.data.tokens[indices].reshape(len(indices), -1)}
        mine = [indices[r] for r in self.rows]
        if self.data.condition_kind == ConditionKind.TEXT:
            batch["cond"] = self.caption_ids([self.data.captions[i] for i in mine])
        elif self.data.condition_kind == ConditionKind.CLASS:
            batch["cond"] = self.data.labels[mine]
        return batch
