"""Condition encoders: CLIP text (SPEC section 1.2), the learned null condition, class labels."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


class CLIPTextCondition(nn.Module):
    """A frozen CLIP text transformer as the condition: ``encode(prompts) -> [B, L, D]``.

    The output is the final layer norm's output at all L = ``max_length`` positions, each L2-normalised
    (the text projection is not used), as the published VQ-Diffusion models and diffusers expect.  All
    positions feed cross-attention, so padding matters: ``pad_token_id`` replaces every id after the
    end-of-text token (the authors' tokenizer pads with 0); None keeps the tokenizer's own padding
    (``<|endoftext|>`` for CLIP, what diffusers feeds).  CLIP's causal mask means padding never changes
    the embeddings of the earlier positions; no attention mask is passed, as in diffusers.
    """

    def __init__(self, text_model: nn.Module, tokenizer, *, pad_token_id: int | None = None) -> None:
        super().__init__()
        self.text_model = text_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        positions = int(text_model.config.max_position_embeddings)
        self.max_length = min(int(tokenizer.model_max_length), positions)
        if pad_token_id is not None and not 0 <= pad_token_id < int(text_model.config.vocab_size):
            raise ValueError(f"pad_token_id {pad_token_id} outside the vocabulary [0, {text_model.config.vocab_size})")

    @property
    def hidden_size(self) -> int:
        return int(self.text_model.config.hidden_size)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, L] long ids: BOS, text, EOS, then padding; over-long prompts are cut (EOS kept)."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        untruncated = self.tokenizer(prompts, truncation=False).input_ids
        for prompt, full in zip(prompts, untruncated, strict=True):
            if len(full) > self.max_length:
                logger.warning("prompt truncated to %d tokens: %r", self.max_length, prompt)
        if self.pad_token_id is not None:
            eos = self.tokenizer.eos_token_id
            first_eos = (ids == eos).int().argmax(dim=1, keepdim=True)  # [B, 1]
            after = torch.arange(ids.shape[1])[None] > first_eos
            ids = ids.masked_fill(after, self.pad_token_id)
        return ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] L2-normalised final-layer-norm states."""
        device = next(self.text_model.parameters()).device
        hidden = self.text_model(input_ids=ids.to(device)).last_hidden_state
        return hidden / hidden.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Non-empty prompts -> [B, L, D] condition sequence."""
        if isinstance(prompts, str) or not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not a string")
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty; give some text (use guidance for unconditional sampling)")
        return self.encode_ids(self.tokenize(list(prompts)))

    @torch.no_grad()
    def encode_unconditional(self, batch_size: int) -> torch.Tensor:
        """The empty prompt's encoding [B, L, D] (the null condition of non-learnable models)."""
        return self.encode_ids(self.tokenize([""])).expand(batch_size, -1, -1)

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        *,
        pad_token_id: int | None = None,
    ) -> CLIPTextCondition:
        """Load transformers' ``CLIPTextModel`` and ``CLIPTokenizer`` from local directories only."""
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        for folder in (text_encoder_dir, tokenizer_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"missing directory: {folder}")
        if not (text_encoder_dir / "config.json").is_file():
            raise FileNotFoundError(f"missing file: {text_encoder_dir / 'config.json'}")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except Exception as err:  # transformers raises many types for a bad folder
            raise ValueError(f"{tokenizer_dir}: cannot load a CLIP tokenizer ({type(err).__name__}: {err})") from None
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # loading a small local model needs no progress bar on stderr
        try:
            model = CLIPTextModel.from_pretrained(str(text_encoder_dir), local_files_only=True)
        except Exception as err:
            raise ValueError(
                f"{text_encoder_dir}: cannot load a CLIP text model ({type(err).__name__}: {err})"
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return cls(model, tokenizer, pad_token_id=pad_token_id)

    def save_pretrained(self, text_encoder_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> None:
        """Write the text model (safetensors) and the tokenizer files."""
        self.text_model.save_pretrained(str(text_encoder_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tokenizer_dir))


class LearnedNullCondition(nn.Module):
    """The learned null text of Improved VQ-Diffusion's classifier-free guidance (sec. 3.1): [L, D]."""

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        if embedding.ndim != 2:
            raise ValueError(f"null condition must be [L, D], got shape {tuple(embedding.shape)}")
        self.embedding = nn.Parameter(embedding)

    def forward(self, batch_size: int) -> torch.Tensor:
        """[B, L, D] (an expanded view, no copy)."""
        return self.embedding[None].expand(batch_size, -1, -1)


class ClassCondition(nn.Module):
    """Class labels as a one-token condition sequence [B, 1, D]; index ``num_classes`` is the null class
    used for guidance when ``learnable_null`` is set."""

    def __init__(self, num_classes: int, dim: int, *, learnable_null: bool = True) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        self.num_classes = num_classes
        self.learnable_null = learnable_null
        self.embedding = nn.Embedding(num_classes + int(learnable_null), dim)

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """[B] long labels in [0, num_classes) -> [B, 1, D]."""
        labels = torch.as_tensor(labels, device=self.embedding.weight.device)
        if labels.ndim != 1 or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be a [B] integer tensor, got {tuple(labels.shape)} {labels.dtype}")
        if bool((labels < 0).any()) or bool((labels >= self.num_classes).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        return self.embedding(labels)[:, None]

    def null(self, batch_size: int) -> torch.Tensor:
        """The null class [B, 1, D] (needs ``learnable_null``)."""
        if not self.learnable_null:
            raise ValueError("this class condition has no null class; guidance needs learnable_null=True")
        return self.embedding.weight[self.num_classes][None, None].expand(batch_size, 1, -1)
