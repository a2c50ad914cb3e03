"""The modules a denoiser run trains: the denoiser with its condition (a trained or frozen text model and
the learned null text, or class labels with a null label), their initialisation and the text model's construction."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..data.tokens import TokenDataset
from ..models.conditions import CLIPTextCondition, ConditionKind, LearnedNullCondition
from ..models.denoiser import Denoiser
from ..text_vocab import build_char_clip_tokenizer
from .denoiser_config import DenoiserTrainConfig

_INIT_STD = 0.02


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
    """Every trained module: the denoiser plus, when present, the trained text model (``text``) and the
    learned null text (``null``) of a text model.  A class-conditional model's labels live inside the
    denoiser (its label AdaLN table, see :class:`~vqdiffusion.models.denoiser.DenoiserConfig`); its learned
    null class is the last row of that table, label ``null_label``.

    ``forward(x_t [B, N], t [B], cond_input, drop [B] bool) -> log p(x0) [B, K, N]`` where ``cond_input`` is
    token ids [B, L] (trained text), a condition [B, L, D] (frozen text, encoded outside), labels [B]
    (classes) or None (unconditional); rows with ``drop`` set get the null condition.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        text: CLIPTextCondition | None = None,
        null: LearnedNullCondition | None = None,
        null_label: int | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.text = text
        self.null = null
        self.null_label = null_label

    @property
    def has_null(self) -> bool:
        """Whether a null condition is trained (classifier-free guidance is possible)."""
        return self.null is not None or self.null_label is not None

    def condition(self, cond_input: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor | None:
        """The denoiser's condition with the rows where ``drop`` is set replaced by the null: [B, L, D] for
        text, [B] labels for classes, None for an unconditional model.

        The null always takes part in the graph (``torch.where``), so DDP never sees an unused parameter.
        """
        if cond_input is None:
            return None
        if self.denoiser.config.condition_kind == ConditionKind.CLASS:
            if self.null_label is None:
                return cond_input
            return torch.where(drop, torch.full_like(cond_input, self.null_label), cond_input)
        cond = self.text.encode_ids(cond_input) if self.text is not None else cond_input
        if self.null is not None:
            null = self.null(cond.shape[0]).to(cond.dtype)
            cond = torch.where(drop[:, None, None], null, cond)
        return cond

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond_input: torch.Tensor | None, drop: torch.Tensor
    ) -> torch.Tensor:
        return self.denoiser(x_t, t, self.condition(cond_input, drop), validate=False)


def build_train_module(
    config: DenoiserTrainConfig, data: TokenDataset, device: torch.device
) -> tuple[DenoiserTrainModule, CLIPTextCondition | None]:
    """A freshly initialised :class:`DenoiserTrainModule` for the token folder ``data`` (its K, grid and
    condition kind), on ``device``; and the frozen pretrained text model, if the run uses one.

    Text: a trained CLIP-architecture text model (``text_model="train"``) or a frozen local CLIP; with
    ``cond_drop_prob > 0`` a learned null text, started at the encoding of the empty prompt (where real
    conditions live).  Classes: the denoiser's label AdaLN table, one row per class plus the null row
    (the published ImageNet model's layout).  Unconditional: neither.
    """
    kind, use_null = data.condition_kind, config.cond_drop_prob > 0
    text, frozen, null = None, None, None
    cond_dim, label_rows, null_label = None, None, None
    if kind == ConditionKind.TEXT:
        if config.text_model == "train":
            text = build_text_model(config)
        elif config.text_encoder_dir is None:
            raise ConfigError(
                f"{data.root} holds captions: give text_encoder_dir and tokenizer_dir (a local CLIP, frozen) or "
                "text_model='train' (train a small text model jointly)"
            )
        else:
            frozen = CLIPTextCondition.from_pretrained(
                config.text_encoder_dir, config.tokenizer_dir, pad_token_id=config.text_pad_token_id
            ).to(device)
            if config.cond_dim is not None and config.cond_dim != frozen.hidden_size:
                raise ConfigError(
                    f"cond_dim={config.cond_dim} differs from the text encoder's width {frozen.hidden_size}; "
                    "drop cond_dim"
                )
        encoder = text or frozen
        cond_dim = encoder.hidden_size
        if use_null:
            with torch.no_grad():
                empty = encoder.encode_ids(encoder.tokenize([""]).to(encoder.device))[0].float().cpu()
            null = LearnedNullCondition(empty.clone())
    elif kind == ConditionKind.CLASS:
        num_labels = len(data.class_names)
        label_rows, null_label = num_labels + int(use_null), num_labels if use_null else None
    denoiser = Denoiser(config.denoiser_config(data.num_classes, data.token_shape, cond_dim, label_rows))
    init_denoiser_weights(denoiser)
    module = DenoiserTrainModule(denoiser, text=text, null=null, null_label=null_label)
    return module.to(device), frozen


def adamw_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on biases, norms and embeddings (the label
    and step tables, the null text)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "embedding" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
