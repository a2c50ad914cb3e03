"""aMUSEd's text condition (docs/design.md §6.3): a frozen ``CLIPTextModelWithProjection``, prompts ->
(penultimate hidden states, pooled projection); it shares the tokenisation and folder checks of
:mod:`vqdiffusion.models.conditions`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import check_finite
from .conditions import (
    FrozenTextModel,
    PromptIds,
    _check_batch_size,
    _check_text_encoder_dir,
    _check_text_encoder_sizes,
    _check_tokenizer_dir,
    _no_transformers_progress_bars,
)

__all__ = ["CLIPPooledTextCondition"]


class CLIPPooledTextCondition(FrozenTextModel):
    """aMUSEd's text condition: a frozen ``CLIPTextModelWithProjection``; prompts -> (hidden states, pooled).

    ``hidden states`` [B, L, D] are the *penultimate* layer's output (before the final layer norm, not
    normalised), ``pooled`` [B, P] the projected end-of-text embedding (transformers' ``text_embeds``).
    Prompts are tokenised as diffusers' ``AmusedPipeline`` does: BOS, pieces, EOS, the tokenizer's own pad
    token up to L = ``max_length``; a longer prompt keeps BOS, its first L - 2 pieces and EOS.  The empty
    prompt is allowed (it is aMUSEd's null condition).
    """

    def __init__(self, text_model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        config = text_model.config
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"the tokenizer has no {name}; aMUSEd's CLIP tokenizer has BOS, EOS and a pad token")
        if len(tokenizer) > int(config.vocab_size):
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text model embeds {config.vocab_size}")
        if not hasattr(text_model, "text_projection"):
            raise ValueError(
                f"aMUSEd needs a CLIPTextModelWithProjection (pooled text_embeds), got {type(text_model).__name__}"
            )
        self._hold(text_model, tokenizer)

    @property
    def projection_dim(self) -> int:
        """P, the width of the pooled embedding."""
        return int(self.text_model.config.projection_dim)

    def tokenize(self, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """B prompts -> [B, L] long ids (BOS, pieces, EOS, the tokenizer's padding)."""
        return PromptIds(self.tokenizer, self.max_length, self.tokenizer.pad_token_id)(prompts, device)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] long ids -> (penultimate hidden states [B, L, D], pooled projection [B, P])."""
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be a [B, L] integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
        out = self.text_model(input_ids=ids.to(self.device), output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A non-empty list of prompts ("" allowed) -> (hidden states [B, L, D], pooled [B, P])."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is an empty list; give at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] is a {type(prompt).__name__}, not a string")
        return self.encode_ids(self.tokenize(prompts, device=self.device))

    def encode_unconditional(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's encoding expanded to B rows (aMUSEd's null condition for guidance)."""
        _check_batch_size(batch_size)
        hidden, pooled = self.encode([""])
        return hidden.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
    ) -> CLIPPooledTextCondition:
        """Load a ``CLIPTextModelWithProjection`` (``model[.<variant>].safetensors``) and a ``CLIPTokenizer``
        from local folders (never the hub).  FileNotFoundError / ValueError as :class:`CLIPTextCondition`."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        if variant is None:
            _check_text_encoder_dir(text_encoder_dir)
            _check_text_encoder_sizes(text_encoder_dir)
        elif not (text_encoder_dir / "config.json").is_file():
            raise FileNotFoundError(f"{text_encoder_dir / 'config.json'} not found (a CLIP text model folder)")
        _check_tokenizer_dir(tokenizer_dir)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, JSON and tokenizers errors
            raise ValueError(f"cannot load a CLIP tokenizer from {tokenizer_dir}: {type(err).__name__}: {err}") from err
        try:
            with _no_transformers_progress_bars():
                model, info = CLIPTextModelWithProjection.from_pretrained(
                    str(text_encoder_dir), local_files_only=True, output_loading_info=True, variant=variant
                )
        except Exception as err:  # as above, plus safetensors errors for damaged weights
            raise ValueError(
                f"cannot load a CLIPTextModelWithProjection from {text_encoder_dir} (variant {variant!r}): "
                f"{type(err).__name__}: {err}"
            ) from err
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{text_encoder_dir}: the weights lack {len(missing)} parameter(s), e.g. {missing[:3]}")
        check_finite(model.state_dict(), str(text_encoder_dir))
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, tokenizer)

    def save_pretrained(self, text_encoder_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> None:
        """Write the text model (config.json + model.safetensors) and the tokenizer files."""
        with _no_transformers_progress_bars():
            self.text_model.save_pretrained(str(text_encoder_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tokenizer_dir))
