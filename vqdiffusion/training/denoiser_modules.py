"""The modules a denoiser run trains: the denoiser with its condition (a trained or frozen text model and
the learned null text, or class labels with a null label), their initialisation and the text model's construction."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
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
